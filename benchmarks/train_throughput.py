"""Training throughput of `matnet train` in images/s, side by side: fp32 against bf16 autocast, NCHW against
channels_last, eager against compiled, reference ops against fused ops, and 1 process against 2 (gloo).

    python benchmarks/train_throughput.py --preset cifar10 --data-dir DIR [--steps 10] [--rounds 1] [--device cuda]

Each setting is a real `matnet train` run (the data pipeline, optimizer and guards included) with the same seed
and batch; images/s is read from its metrics rows after the first (which holds start-up and compilation). The
settings run one after another in each round and the best round is kept, so every ratio comes from one run of
this script. The 2-process setting gives each process half the threads of the 1-process ones. `--device cuda`
runs the GPU settings instead: bf16 and fp32, eager and compiled, and compiled with CUDA graphs (reduce-overhead).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from matnet.train import COMPILE_MODES

SETTINGS: list[tuple[str, list[str], int]] = [  # name, extra flags, processes
    ("reference ops, fp32, NCHW, eager", ["--ops", "reference"], 1),
    ("reference ops, bf16, NCHW, eager", ["--ops", "reference", "--precision", "bf16"], 1),
    ("reference ops, fp32, channels_last, eager", ["--ops", "reference", "--channels-last"], 1),
    ("reference ops, fp32, NCHW, compiled", ["--ops", "reference", "--compile"], 1),
    ("fused ops, fp32, NCHW, eager", ["--ops", "fast"], 1),
    ("fused ops, fp32, channels_last, eager", ["--ops", "fast", "--channels-last"], 1),
    ("fused ops, bf16, channels_last, eager", ["--ops", "fast", "--channels-last", "--precision", "bf16"], 1),
    ("fused ops, fp32, channels_last, compiled", ["--ops", "fast", "--channels-last", "--compile"], 1),
    ("fused ops, fp32, channels_last, eager, 2 processes (gloo)", ["--ops", "fast", "--channels-last"], 2),
]
_BF16_CL = ["--precision", "bf16", "--channels-last"]
CUDA_SETTINGS: list[tuple[str, list[str], int]] = [
    ("reference ops, fp32, NCHW, eager", ["--ops", "reference"], 1),
    ("reference ops, bf16, channels_last, eager", ["--ops", "reference", *_BF16_CL], 1),
    ("reference ops, bf16, channels_last, compiled", ["--ops", "reference", *_BF16_CL, "--compile"], 1),
    ("reference ops, bf16, channels_last, compiled, CUDA graphs",
     ["--ops", "reference", *_BF16_CL, "--compile", "--compile-mode", "reduce-overhead"], 1),
    ("fused ops, fp32, channels_last, eager", ["--ops", "fast", "--channels-last"], 1),
    ("fused ops, bf16, channels_last, eager", ["--ops", "fast", *_BF16_CL], 1),
    ("fused ops, bf16, channels_last, compiled", ["--ops", "fast", *_BF16_CL, "--compile"], 1),
    ("fused ops, bf16, channels_last, compiled, CUDA graphs",
     ["--ops", "fast", *_BF16_CL, "--compile", "--compile-mode", "reduce-overhead"], 1),
]


class SettingFailed(RuntimeError):
    """One setting's run failed: reported, and the other settings still run."""


def run_setting(flags: list[str], procs: int, a: argparse.Namespace, out: Path) -> tuple[float, str]:
    """images/s of one `matnet train` run (the median of its metrics rows after the first), and why
    torch.compile skipped CUDA graphs for some of its graphs where it was asked for them ("" if it never
    did, or was not asked)."""
    threads = max(1, a.threads // procs)
    train = ["train", "--preset", a.preset, "--steps", str(a.steps), "--log-every", "2", "--eval-every", "0",
             "--ckpt-every", "0", "--no-resume", "--no-progress", "--threads", str(threads), "--out", str(out),
             "--device", a.device,
             *(["--data-dir", a.data_dir] if a.data_dir else []), *(["--batch-size", str(a.batch)] if a.batch else []),
             *flags]
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
              if procs > 1 else [sys.executable])
    graphs = any(mode in flags for mode, uses_graphs in COMPILE_MODES.items() if uses_graphs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if graphs:  # perf hints name each graph that runs without CUDA graphs, and why
        env["TORCH_LOGS"] = ",".join(filter(None, [env.get("TORCH_LOGS"), "perf_hints"]))
    try:
        r = subprocess.run([*launch, "-m", "matnet", *train], env=env, capture_output=True, text=True,
                           timeout=a.timeout or None)
    except subprocess.TimeoutExpired as e:
        raise SettingFailed(f"matnet train {' '.join(flags)} did not finish in --timeout {a.timeout} s") from e
    if r.returncode != 0:
        raise SettingFailed(f"matnet train {' '.join(flags)} failed (exit {r.returncode}): {r.stderr.strip()[-2000:]}")
    try:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        speeds = [row["images_per_s"] for row in rows if row.get("split") == "train"][1:]
    except (OSError, ValueError, KeyError) as e:
        raise SettingFailed(f"matnet train {' '.join(flags)}: unreadable metrics.jsonl ({e})") from e
    if not speeds:
        raise SettingFailed(f"matnet train {' '.join(flags)} wrote no timed metrics rows")
    skips = sorted({line.split("skipping cudagraphs", 1)[1].split(". Found from")[0].strip()
                    for line in r.stderr.splitlines() if graphs and "skipping cudagraphs" in line})
    return statistics.median(speeds), "; ".join(skips)[:300]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cifar10")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: $MATNET_DATA_DIR)")
    p.add_argument("--batch", type=int, default=0, help="global batch (0: the preset's)")
    p.add_argument("--steps", type=int, default=10, help="training steps per setting, > 2")
    p.add_argument("--rounds", type=int, default=1, help="rounds over all settings (the best is kept)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads per setting")
    p.add_argument("--only", default="", help="comma-separated setting numbers (1-based) to run")
    p.add_argument("--json", default=None, help="also write the table here (after each setting)")
    p.add_argument("--timeout", type=float, default=0, help="seconds a setting may take before it counts as "
                   "failed (0: no limit)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where every setting trains")
    a = p.parse_args(argv)
    if a.steps <= 2:
        p.error(f"--steps must be above 2 (the first metrics row holds start-up), got {a.steps}")
    settings = CUDA_SETTINGS if a.device == "cuda" else SETTINGS
    chosen = [settings[int(i) - 1] for i in a.only.split(",")] if a.only else settings
    best: dict[str, float] = {}
    no_graphs: dict[str, str] = {}
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for i, (name, flags, procs) in enumerate(chosen):
                try:
                    ips, skipped = run_setting(flags, procs, a, Path(tmp) / f"run{r}_{i}")
                except SettingFailed as e:
                    failed.setdefault(name, str(e))
                    print(f"round {r + 1}: {name:58s} FAILED: {e}", file=sys.stderr, flush=True)
                else:
                    best[name] = max(best.get(name, 0.0), ips)
                    print(f"round {r + 1}: {name:58s} {ips:8.1f} images/s", file=sys.stderr, flush=True)
                    if skipped:
                        no_graphs[name] = skipped
                if a.json:  # after every setting: images/s, null for one not run yet or failed in every round
                    Path(a.json).write_text(json.dumps({n: best.get(n) for n, _, _ in chosen}, indent=2))
    base = best.get(chosen[0][0])
    print(f"\n{a.preset}, global batch {a.batch or 'of the preset'}, {a.device}, {a.threads} threads, "
          f"best of {a.rounds}")
    print(f"| setting | images/s | vs {chosen[0][0]} |\n|---|---:|---:|")
    for name, _, _ in chosen:
        if name in best:
            print(f"| {name} | {best[name]:.1f} | {f'{best[name] / base:.2f}x' if base else '-'} |")
        else:
            print(f"| {name} | failed | - |")
    for name, why in no_graphs.items():
        print(f"\n{name}: torch.compile skipped CUDA graphs for some graphs: {why}")
    for name, why in failed.items():
        if name not in best:
            print(f"\n{name} failed: {why[-1000:]}")
    return 1 if any(name not in best for name, _, _ in chosen) else 0


if __name__ == "__main__":
    raise SystemExit(main())
