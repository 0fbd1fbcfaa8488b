"""Turn a pytest-benchmark JSON file of matnet's benchmark suite into a table.

    pytest benchmarks/ --benchmark-only --benchmark-json=out.json
    python benchmarks/report.py out.json [--markdown] [--stat median|min|mean]

One row per benchmark group (one op or model step at one shape, mode, device and dtype), one table per
device. Columns: the time per call of each implementation (reference, fast, compiled), the speed-up of
fast over reference (reference time / fast time) and over torch.compile (compiled time / fast time),
images per second, and the achieved memory bandwidth (GB/s) and arithmetic rate (TFLOP/s) of the fast
implementation from the analytic bytes and FLOPs each benchmark stores in its extra_info. On a GPU
listed in PEAKS they are also given as fractions of the device's peak; elsewhere as absolute rates only.
Variants of fast (e.g. fast-cl: channels_last; fast-cl-bf16: also bf16 autocast) get their ratios in the notes.
Standard library only: runs without torch.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

# Vendor datasheet peaks (dense, no sparsity): (pattern matched against the CUDA device name,
# label, memory bandwidth in GB/s, {precision: TFLOP/s}). First match wins.
PEAKS: list[tuple[str, str, float, dict[str, float]]] = [
    (r"\bh200\b.*\bnvl\b", "H200 NVL", 4800.0, {"bf16": 835.0, "tf32": 418.0, "fp32": 60.0}),
    (r"\bh200\b", "H200 SXM", 4800.0, {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    (r"\bh100\b.*\bnvl\b", "H100 NVL", 3900.0, {"bf16": 835.0, "tf32": 418.0, "fp32": 60.0}),
    (r"\bh100\b.*\bpcie\b", "H100 PCIe", 2000.0, {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    (r"\bh100\b", "H100 SXM", 3350.0, {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    (r"\ba100\b.*\bsxm4?\b.*80gb", "A100 SXM 80GB", 2039.0, {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"\ba100\b.*80gb", "A100 PCIe 80GB", 1935.0, {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"\ba100\b", "A100 40GB", 1555.0, {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
]
# ops whose FLOPs are convolutions / matrix products (tensor cores); the others are elementwise and are
# compared with the fp32 CUDA-core peak
TENSOR_CORE_OPS = {"residual_conv_block", "masked_conv2d", "train_step", "sample", "iwae_nll"}
IMPL_ORDER = ("reference", "fast", "compiled")


def find_peak(device_name: str) -> tuple[str, float, dict[str, float]] | None:
    name = device_name.lower()
    for pattern, label, bandwidth, flops in PEAKS:
        if re.search(pattern, name):
            return label, bandwidth, flops
    return None


def flop_precision(info: dict[str, Any]) -> str:
    """Which FLOP peak applies: tensor-core bf16 / tf32 for convolution ops, fp32 otherwise."""
    if info.get("op") not in TENSOR_CORE_OPS:
        return "fp32"
    if info.get("dtype") == "bf16":
        return "bf16"
    return "tf32" if info.get("tf32") else "fp32"


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def fmt_num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if value >= 10 ** digits:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.1f}%"


def load(*paths: str) -> dict[str, Any]:
    """One results file, or several as one: their benchmarks in order, the first file's machine and commit. A case
    in two files is refused (the later would silently replace the earlier in the tables)."""
    datas, seen = [], {}
    for path in paths:
        with open(path) as f:
            datas.append(json.load(f))
        for key in map(_cell, datas[-1].get("benchmarks", [])):
            if key in seen:
                raise SystemExit(f"report.py: {key[2]} ({key[3]}) on {key[1]} is in both {seen[key]} and {path}: "
                                 "give each case once")
            seen[key] = path
    return {**datas[0], "benchmarks": [b for d in datas for b in d.get("benchmarks", [])]}


def _cell(b: dict[str, Any]) -> tuple[str, str, str, str]:
    """(device, device name, group, impl): where a benchmark goes in the report."""
    info = b.get("extra_info") or {}
    impl = (b.get("params") or {}).get("impl") or info.get("impl") or b.get("name", "?")
    return info.get("device", "?"), info.get("device_name", "?"), b.get("group") or b.get("name", "?"), impl


def collect(data: dict[str, Any], stat: str) -> dict[tuple[str, str], dict[str, dict[str, Any]]]:
    """{(device, device name): {group: {impl: {"time": seconds, "info": extra_info, "name": test name}}}},
    in the order the benchmarks ran."""
    sections: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for b in data.get("benchmarks", []):
        device, name, group, impl = _cell(b)
        stats = b.get("stats") or {}
        sections.setdefault((device, name), {}).setdefault(group, {})[impl] = {
            "time": stats.get(stat), "info": b.get("extra_info") or {}, "name": b.get("name", "")}
    return sections


def rows_for(groups: dict[str, dict[str, Any]], peak, device: str) -> tuple[list[str], list[list[str]], set[str]]:
    notes: set[str] = set()
    flop_unit, flop_scale = ("TFLOP/s", 1e12) if device == "cuda" else ("GFLOP/s", 1e9)
    kernels = any("kernel_s" in v["info"] for impls in groups.values() for v in impls.values())
    header = ["benchmark", "reference", "fast", *(["fast kernels"] if kernels else []), "compiled", "ref/fast",
              "compiled/fast", "img/s ref", "img/s fast", "GB/s fast", *(["% peak BW"] if peak else []),
              f"{flop_unit} fast", *(["% peak FLOP"] if peak else []), "notes"]
    rows = []
    for group, impls in groups.items():
        t = {name: impls[name]["time"] if name in impls else None for name in IMPL_ORDER}
        # rates of the fast implementation (else of whichever ran)
        main = "fast" if "fast" in impls else next(iter(impls))
        info = impls[main]["info"]
        tk = info.get("kernel_s")  # the kernels' own time (CUDA events): what the rates use where measured
        tm = tk or impls[main]["time"]
        ratio = t["reference"] / t["fast"] if t["reference"] and t["fast"] else None
        vs_compiled = t["compiled"] / t["fast"] if t["compiled"] and t["fast"] else None

        def per_s(name, t=t, impls=impls):
            if not t.get(name) or name not in impls:
                return None
            images = impls[name]["info"].get("images")
            return images / t[name] if images else None

        gbs = info["bytes"] / tm / 1e9 if info.get("bytes") and tm else None
        flop_rate = info["flops"] / tm / flop_scale if info.get("flops") and tm else None
        note = []
        if main != "fast":
            note.append(f"rates: {main}")
        fn = info.get("fn", "")
        if "fast" in impls and (".reference." in fn or info.get("force_reference")):
            note.append("fast=reference")
            notes.add("fast=reference")
        if any(v["info"].get("quick") for v in impls.values()):
            note.append("quick")
            notes.add("quick")
        for extra in (n for n in impls if n not in IMPL_ORDER):  # variants of fast (layout, autocast)
            te = impls[extra]["time"]
            if te:
                vs = [f"ref/{extra} {fmt_ratio(t['reference'] / te)}" if t["reference"] else None,
                      f"compiled/{extra} {fmt_ratio(t['compiled'] / te)}" if t["compiled"] else None]
                note.append(", ".join(v for v in vs if v))
        if info.get("kernel_error"):
            note.append(f"kernel time failed: {info['kernel_error'][:80]}")
        rk = impls.get("reference", {}).get("info", {}).get("kernel_s")
        if rk and tk and main == "fast":
            note.append(f"kernels: ref/fast {fmt_ratio(rk / tk)}")
        if "compiled" in impls and impls["compiled"]["info"].get("compile_s") is not None:
            note.append(f"compile {impls['compiled']['info']['compile_s']:.0f} s")
        cells = {"benchmark": group, "reference": fmt_time(t["reference"]), "fast": fmt_time(t["fast"]),
                 "fast kernels": fmt_time(tk), "compiled": fmt_time(t["compiled"]), "ref/fast": fmt_ratio(ratio),
                 "compiled/fast": fmt_ratio(vs_compiled), "img/s ref": fmt_num(per_s("reference")),
                 "img/s fast": fmt_num(per_s("fast")), "GB/s fast": fmt_num(gbs),
                 f"{flop_unit} fast": fmt_num(flop_rate), "notes": ", ".join(note)}
        if peak:
            _, bandwidth, flop_peaks = peak
            fpk = flop_peaks.get(flop_precision(info))
            cells["% peak BW"] = fmt_pct(gbs / bandwidth if gbs is not None else None)
            cells["% peak FLOP"] = fmt_pct(flop_rate * flop_scale / 1e12 / fpk if flop_rate is not None and fpk
                                           else None)
        row = [cells[h] for h in header]
        rows.append(row)
    return header, rows, notes


def render(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        right = [i > 0 and h != "notes" for i, h in enumerate(header)]
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join("---:" if r else "---" for r in right) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.ljust(w) if i in (0, len(cells) - 1) else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def section_title(device: str, device_name: str, groups: dict[str, dict[str, Any]], peak) -> str:
    first = next(iter(next(iter(groups.values())).values()))["info"]
    if device == "cuda":
        title = f"CUDA: {device_name}"
        if first.get("cuda"):
            title += f", CUDA {first['cuda']}"
        if peak:
            label, bandwidth, flops = peak
            title += (f" (peaks of {label}: {bandwidth:.0f} GB/s; bf16 {flops['bf16']:.0f}, tf32 {flops['tf32']:.0f},"
                      f" fp32 {flops['fp32']:.1f} TFLOP/s)")
        else:
            title += " (no peak known for this device: absolute rates only)"
    else:
        title = f"{device.upper()}: {device_name}, {first.get('threads', '?')} threads"
    return title + f", torch {first.get('torch', '?')}"


def report(data: dict[str, Any], markdown: bool = False, stat: str = "median") -> str:
    sections = collect(data, stat)
    if not sections:
        return "no benchmark results in this file (was it written with --benchmark-disable?)"
    out = []
    machine = data.get("machine_info") or {}
    commit = data.get("commit_info") or {}
    head = f"pytest-benchmark results, {stat} time per call"
    if data.get("datetime"):
        head += f", {data['datetime']}"
    if commit.get("id"):
        head += f", commit {commit['id'][:10]}{' (dirty)' if commit.get('dirty') else ''}"
    if machine.get("node"):
        head += f", host {machine['node']}"
    out.append(head)
    all_notes: set[str] = set()
    order = sorted(sections, key=lambda k: (k[0] != "cpu", k))
    for device, name in order:
        groups = sections[(device, name)]
        peak = find_peak(name) if device == "cuda" else None
        title = section_title(device, name, groups, peak)
        header, rows, notes = rows_for(groups, peak, device)
        all_notes |= notes
        out.append("")
        out.append(f"### {title}" if markdown else f"== {title} ==")
        out.append("")
        out.append(render(header, rows, markdown))
    legend = ["ref/fast: speed-up of the fast implementation over the reference (> 1: faster);"
              " compiled/fast: over torch.compile of the reference (op or MatNet).",
              "img/s: images per second (IWAE: images x samples); GB/s and FLOP/s: analytic bytes and FLOPs"
              " per call (benchmarks/benchutil.py) over the fast time: its kernels' own time where measured"
              " ('fast kernels': CUDA events, launch overhead hidden), else the time per call.",
              "% peak FLOP: against bf16 / tf32 tensor-core peaks for convolution ops and model steps"
              " (tf32 where torch allows it for fp32), against the fp32 peak for elementwise ops."]
    if "fast=reference" in all_notes:
        legend.append("fast=reference: the fast entry point resolved to the reference implementation"
                      " (not wired yet, or MATNET_FORCE_REFERENCE=1).")
    if "quick" in all_notes:
        legend.append("quick: measured in quick mode (shrunk batches): not representative.")
    out.append("")
    out += [("- " if markdown else "") + line for line in legend]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="JSON files written by pytest --benchmark-json (several: one report)")
    p.add_argument("--markdown", action="store_true", help="Markdown tables (for benchmarks/RESULTS.md)")
    p.add_argument("--stat", default="median", choices=("median", "min", "mean"),
                   help="which statistic of the rounds to report (default: median)")
    args = p.parse_args(argv)
    text = report(load(*args.results), markdown=args.markdown, stat=args.stat)
    try:
        print(text)
    except BrokenPipeError:  # e.g. piped into head
        sys.stderr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
