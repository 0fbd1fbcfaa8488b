"""Static report of matnet's Triton kernels compiled for a GPU architecture, with no GPU.

    python benchmarks/kernel_report.py --arch sm_90 [--json FILE] [--markdown | --summary]
                                       [--presets mnist,omniglot,cifar10]

Which configs: every preset's FastMatNet forward + backward runs once on the CPU with the reference ops,
recording the shape of each op call; each call is then replayed through the Triton launchers on meta
tensors, at the preset's batch size, in fp32, bf16 and fp16 and with NCHW and channels_last activations
(the NHWC engine), and every kernel launch they make (kernel, argument dtypes, TMA boxes, constexprs,
warps, stages) is recorded instead of run; an autotuned kernel contributes every config it may pick.
Each distinct launch is compiled for the architecture (Triton targets it without a GPU) and reported:
registers per thread, spilled bytes (ptxas), shared memory, and whether the code uses tensor-core MMA
(wgmma on sm_90, mma before) and asynchronous copies (cp.async, TMA).

Exits 1 when a kernel spills, needs more shared memory than the architecture has, or when a bf16/fp16
convolution does not use the tensor-core MMA of the architecture. Arguments are specialised as Triton's
launcher specialises them (pointers and integers divisible by 16 get the divisibility hint, integers equal to
1 become constants), with the meta tensors' offsets standing for the alignment of real allocations: a hint
decides whether loads are vectorised and whether they can become cp.async copies.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

os.environ.pop("TRITON_INTERPRET", None)  # compile, never interpret (before any @triton.jit runs)

import torch  # noqa: E402

SHARED_LIMIT = {90: 232_448, 80: 166_912, 89: 101_376}  # bytes per block (opt-in maximum)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRESET_BATCH = {"mnist": 100, "omniglot": 100, "cifar10": 64}


@dataclass
class Launch:
    kernel: str
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int | None
    where: str  # the op and preset that launch it first
    aligned: list  # the arguments the launcher marks divisible by 16

    def key(self) -> str:
        return json.dumps([self.kernel, self.signature, self.constexprs, self.num_warps, self.num_stages,
                           self.aligned], sort_keys=True, default=str)


@dataclass
class Row:
    kernel: str
    where: str
    dtype: str
    config: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    tensor_core_mma: bool
    async_copy: bool
    tma: bool
    problems: list


# ---- recording ---------------------------------------------------------------------------------


def record_op_calls(preset: str) -> list[tuple[str, tuple]]:
    """(op, args) of every fwd/bwd launch of one FastMatNet training step of `preset`, as a GPU step makes them:
    each op's dispatch table is swapped for a recording backend (the reference launchers, spied on), so the
    public wrappers call the registered ops as they do on CUDA, never the CPU's composite path."""
    import matnet
    from matnet.ops import gaussian, masked_conv, reference, residual

    calls = []

    class Recording:
        def __init__(self, op: str):
            self.op = op

        def backend(self, t):
            return "recording"

        def _spy(self, which: str):
            attr = f"{self.op}_{which}"
            real = getattr(reference, attr)
            return lambda *args: calls.append((attr, args)) or real(*args)

        def fwd(self, t):
            return self._spy("fwd")

        def bwd(self, t):
            return self._spy("bwd")

    modules = {"residual_conv_block": residual, "masked_conv2d": masked_conv, "gaussian_sample_kl": gaussian}
    tables = {name: m.KERNELS for name, m in modules.items()}
    cfg = matnet.MatNetConfig.preset(preset)
    try:
        for name, m in modules.items():
            m.KERNELS = Recording(name)
        model = matnet.FastMatNet(cfg)
        shape = (2, cfg.image_channels, cfg.image_size, cfg.image_size)
        x = torch.bernoulli(torch.full(shape, 0.5)) if cfg.likelihood == "bernoulli" else torch.rand(shape) * 2 - 1
        model(x).loss.backward()
    finally:
        for name, m in modules.items():
            m.KERNELS = tables[name]
    used = ["residual_conv_block", "gaussian_sample_kl"] + (["masked_conv2d"] if cfg.ar_layers else [])
    missing = {f"{op}_{w}" for op in used for w in ("fwd", "bwd")} - {attr for attr, _ in calls}
    if missing:  # the report would pass on fewer configs than a GPU step launches
        raise RuntimeError(f"{preset}: a FastMatNet step recorded no {', '.join(sorted(missing))} launch")
    return calls


def _meta_like(a, batch: int | None, dtype: torch.dtype, fmt: torch.memory_format = torch.contiguous_format):
    """A float tensor as an empty meta tensor in `dtype`, with its batch dimension set to `batch` (None:
    a weight or bias, kept as it is) and, when 4-d, in layout `fmt`; anything else as it is."""
    if not isinstance(a, torch.Tensor) or not a.is_floating_point():
        return a
    shape = list(a.shape) if batch is None or a.dim() == 0 else [batch] + list(a.shape[1:])
    fmt = fmt if batch is not None and len(shape) == 4 else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device="meta", memory_format=fmt)


def triton_kernels() -> dict:
    """name -> @triton.jit function, for every Triton kernel of matnet."""
    from matnet.kernels import conv_nhwc as CN
    from matnet.kernels import gaussian_sample_kl as G
    from matnet.kernels import residual_conv as RC

    ks = (RC._conv_same_kernel, RC._conv_wgrad_kernel, CN._conv_nhwc_kernel, CN._conv_wgrad_nhwc_kernel,
          G._gaussian_sample_kl_fwd_kernel, G._gaussian_sample_kl_bwd_kernel)
    return {k.__name__: k for k in ks}


def autotuned_kernels() -> list:
    """Every autotuned kernel of matnet (a triton Autotuner around one of `triton_kernels`)."""
    from matnet.kernels import conv_nhwc as CN

    return [CN._conv_nhwc_tuned]


def specialize(k, args) -> tuple[dict, dict, list]:
    """(signature, constants, arguments divisible by 16) of a launch of kernel k, as Triton's launcher
    specialises its arguments for a CUDA device. Covers what matnet's kernels use: positional arguments,
    parameters without type annotations."""
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import native_specialize_impl

    sig, consts, aligned = {}, {}, []
    for kp, a in zip(k.params, args):
        if kp.is_constexpr:
            continue
        ty, attr = native_specialize_impl(CUDABackend, a, kp.is_const, not kp.do_not_specialize,
                                          not kp.do_not_specialize_on_alignment)
        if ty == "constexpr":
            consts[kp.name] = attr
            continue
        sig[kp.name] = ty
        if attr == "D":
            aligned.append(kp.name)
    return sig, consts, aligned


@contextlib.contextmanager
def capturing(sink: dict, where: dict):
    """Within it, a launch of any matnet Triton kernel is recorded in `sink` (key -> Launch, the first of
    each distinct config, attributed to where["op"]) instead of run; a launch of an autotuned kernel is
    recorded once per config its pruning keeps (each could be the one a GPU picks)."""
    kernels = list(triton_kernels().values())
    tuned = autotuned_kernels()
    originals = {k: k.run for k in kernels + tuned}

    def record(k, args, kw):
        sig, consts, aligned = specialize(k, args)
        consts.update({n: v for n, v in kw.items() if n in k.arg_names})
        launch = Launch(k.__name__, sig, consts, kw.get("num_warps", 4), kw.get("num_stages"), where["op"], aligned)
        sink.setdefault(launch.key(), launch)

    def make_run(k):
        def run(*args, grid=None, warmup=False, **kw):
            record(k, args, kw)
        return run

    def make_tuned_run(t):
        def run(*args, grid=None, warmup=False, **kw):
            t.nargs = dict(zip(t.arg_names, args))
            for config in t.prune_configs(kw):
                full = {**t.nargs, **kw, **config.all_kwargs()}
                if config.pre_hook:
                    config.pre_hook(full)  # e.g. the TMA boxes of this config's tile
                record(t.fn, [full[n] for n in t.arg_names if n in t.nargs], {**kw, **config.all_kwargs()})
        return run

    for k in kernels:
        k.run = make_run(k)
    for t in tuned:
        t.run = make_tuned_run(t)
    try:
        yield
    finally:
        for k, r in originals.items():
            k.run = r


LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def replay(calls, batch: int, dtype: torch.dtype, layout: str, preset: str, sink: dict) -> None:
    """Runs the Triton launchers of the recorded calls on meta tensors whose activations are in `layout`
    (nchw: the NCHW kernels, nhwc: the channels-last engine), recording their launches."""
    from matnet.kernels import gaussian_sample_kl as G
    from matnet.kernels import masked_conv as MC
    from matnet.kernels import residual_conv as RC

    launchers = {"residual_conv_block": RC, "masked_conv2d": MC, "gaussian_sample_kl": G}
    weights = {  # which arguments are weights or biases (no batch dimension)
        "residual_conv_block_fwd": {1, 2, 3, 4}, "residual_conv_block_bwd": {3, 4},
        "masked_conv2d_fwd": {1, 2}, "masked_conv2d_bwd": {2},
    }
    where = {"op": ""}
    with capturing(sink, where):
        for attr, args in calls:
            op, which = attr.rsplit("_", 1)
            where["op"] = f"{op} {which} ({preset}, {layout})"
            w = weights.get(attr, set())
            meta = [(_meta_like(a, None, dtype) if i in w else _meta_like(a, batch, dtype, LAYOUTS[layout]))
                    for i, a in enumerate(args)]
            getattr(launchers[op], attr)(*meta)


# ---- compiling ---------------------------------------------------------------------------------


def compile_launch(launch: Launch, kernels: dict, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernels[launch.kernel]
    sig = dict(launch.signature)
    sig.update({k: "constexpr" for k in launch.constexprs})
    opts = {"num_warps": launch.num_warps}
    if launch.num_stages is not None:
        opts["num_stages"] = launch.num_stages
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name in launch.aligned}
    return triton.compile(ASTSource(fn, sig, constexprs=launch.constexprs, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32), options=opts)


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers per thread, spilled bytes: stores + loads) from `ptxas -v`."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        tool = get_ptxas(arch)
    except TypeError:  # older Triton: no argument
        tool = get_ptxas()
    ptxas = tool.path if hasattr(tool, "path") else tool[0] if isinstance(tool, tuple) else tool
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, f"-arch=sm_{arch}{suffix}", "-v", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    return regs, spills


def analyse(launch: Launch, kernels: dict, arch: int) -> Row:
    k = compile_launch(launch, kernels, arch)
    ptx = k.asm["ptx"]
    regs, spills = ptxas_usage(ptx, arch)
    shared = int(k.metadata.shared)
    mma = ("wgmma" in ptx) if arch >= 90 else ("mma.sync" in ptx or "wgmma" in ptx)
    dtypes = {t.lstrip("*") for t in launch.signature.values() if t.startswith("*")}
    dtype = "bf16" if "bf16" in dtypes else "fp16" if "fp16" in dtypes else "fp64" if "fp64" in dtypes else "fp32"
    c = launch.constexprs
    declared = {kp.name for kp in kernels[launch.kernel].params if kp.is_constexpr}  # not the integers equal to 1
    shown = {n: v for n, v in c.items()
             if n in declared and n != "LOWP" and not (n == "DOT_PREC" and c.get("LOWP"))}
    config = ", ".join(f"{n}={int(v) if isinstance(v, bool) else v}" for n, v in shown.items())
    config += f", warps={launch.num_warps}"
    unaligned = [n for n, t in launch.signature.items() if t.startswith("*") and n not in launch.aligned]
    config += f", unaligned={'/'.join(unaligned)}" if unaligned else ""
    problems = []
    if spills:
        problems.append(f"spills {spills} bytes")
    if shared > SHARED_LIMIT.get(arch, SHARED_LIMIT[90]):
        problems.append(f"shared memory {shared} > {SHARED_LIMIT.get(arch, SHARED_LIMIT[90])}")
    if c.get("LOWP") and "conv" in launch.kernel and not mma:
        problems.append("low-precision convolution without tensor-core MMA")
    return Row(launch.kernel, launch.where, dtype, config, regs, spills, shared, mma,
               "cp.async" in ptx, "cp.async.bulk" in ptx, problems)


def _analyse_in_worker(launch: Launch, arch: int) -> Row:
    return analyse(launch, triton_kernels(), arch)


def collect(presets: list[str], dtypes: list[str]) -> list[Launch]:
    sink: dict[str, Launch] = {}
    for preset in presets:
        calls = record_op_calls(preset)
        for layout in LAYOUTS:
            for d in dtypes:
                replay(calls, PRESET_BATCH.get(preset, 100), DTYPES[d], layout, preset, sink)
    return list(sink.values())


def markdown(rows: list[Row], arch: int) -> str:
    head = (f"| kernel | first launched by | dtype | config | regs | spill B | smem KB | "
            f"{'wgmma' if arch >= 90 else 'mma'} | cp.async | TMA | problems |")
    lines = [head, "|---|---|---|---|---:|---:|---:|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.kernel} | {r.where} | {r.dtype} | {r.config} | {r.registers} | {r.spill_bytes} | "
                     f"{r.shared_bytes / 1024:.1f} | {'yes' if r.tensor_core_mma else 'no'} | "
                     f"{'yes' if r.async_copy else 'no'} | {'yes' if r.tma else 'no'} | {'; '.join(r.problems)} |")
    return "\n".join(lines)


def summary(rows: list[Row], arch: int) -> str:
    """One line per (kernel, dtype, layout): how many configs, their register / spill / shared-memory
    range, and how many use tensor-core MMA, cp.async and TMA."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        layout = "nhwc" if "nhwc" in r.where else "nchw"
        groups.setdefault((r.kernel, layout, r.dtype), []).append(r)
    mma = "wgmma" if arch >= 90 else "mma"
    lines = [f"| kernel | layout | dtype | configs | regs | max spill B | max smem KB | {mma} | cp.async | TMA |",
             "|---|---|---|---:|---|---:|---:|---|---|---|"]
    for (kernel, layout, dtype), rs in groups.items():
        regs = sorted(r.registers for r in rs)
        n = len(rs)
        cells = [kernel, layout, dtype, n, f"{regs[0]}-{regs[-1]}", max(r.spill_bytes for r in rs),
                 f"{max(r.shared_bytes for r in rs) / 1024:.1f}", f"{sum(r.tensor_core_mma for r in rs)}/{n}",
                 f"{sum(r.async_copy for r in rs)}/{n}", f"{sum(r.tma for r in rs)}/{n}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sm_90", help="sm_XX (default sm_90)")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    p.add_argument("--markdown", action="store_true", help="a Markdown table, one row per config")
    p.add_argument("--summary", action="store_true", help="a Markdown table, one row per kernel, layout and dtype "
                   "(for benchmarks/RESULTS.md)")
    p.add_argument("--presets", default="mnist,omniglot,cifar10", help="comma-separated presets")
    p.add_argument("--dtypes", default="fp32,bf16,fp16", help="comma-separated: fp32, bf16, fp16")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="configs compiled in parallel")
    a = p.parse_args(argv)
    m = re.fullmatch(r"sm_(\d+)a?", a.arch)
    if not m:
        print(f"kernel_report: --arch must look like sm_90, got {a.arch!r}", file=sys.stderr)
        return 2
    arch = int(m.group(1))
    bad = [d for d in a.dtypes.split(",") if d not in DTYPES]
    if bad:
        print(f"kernel_report: unknown dtype(s) {bad}; use fp32, bf16, fp16", file=sys.stderr)
        return 2
    if a.jobs < 1:
        print(f"kernel_report: --jobs must be >= 1, got {a.jobs}", file=sys.stderr)
        return 2
    launches = collect(a.presets.split(","), a.dtypes.split(","))
    with concurrent.futures.ProcessPoolExecutor(a.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        rows = []
        for i, row in enumerate(pool.map(_analyse_in_worker, launches, [arch] * len(launches))):
            print(f"[{i + 1}/{len(launches)}] {row.kernel} ({row.where})", file=sys.stderr)
            rows.append(row)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"arch": a.arch, "rows": [asdict(r) for r in rows]}, f, indent=1)
    if a.summary:
        print(summary(rows, arch))
    elif a.markdown:
        print(markdown(rows, arch))
    else:
        for r in rows:
            print(f"{r.kernel:34s} {r.dtype:5s} regs {r.registers:3d} spill {r.spill_bytes:4d} "
                  f"smem {r.shared_bytes:7d} mma {int(r.tensor_core_mma)} async {int(r.async_copy)} "
                  f"{r.config} {'; '.join(r.problems)}")
    problems = [r for r in rows if r.problems]
    print(f"{len(rows)} kernel configs compiled for {a.arch}; {len(problems)} with problems", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
