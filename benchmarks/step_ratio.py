"""Training-step time of MatNet against FastMatNet, interleaved: each round runs one step of every model in
turn, so a machine that slows down or speeds up during the run weighs on all of them alike.

    python benchmarks/step_ratio.py --preset mnist --batch 100 --rounds 20 --threads 2 \
        [--models reference,fast-cl,fast-cl-bf16,compiled] [--malloc kept|default]

Models, weights and batch come from test_bench_model.py (build, make_batch); the step is forward, backward,
gradient clipping and the trainer's Adam (matnet.optim.build_optimizer: fused on CPU).
--malloc kept (the default): freed memory kept for reuse, as the `matnet` command sets it (matnet.memory);
default: glibc's own malloc. With glibc's own, models in one process share its adaptive thresholds and slow
whichever runs after another: measure that case one model per process (--models reference, ...).
Prints the median time of each model and the median over rounds of reference time / model time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from test_bench_model import build, make_batch

from matnet import memory
from matnet.optim import build_optimizer

IMPLS = ("reference", "reference-cl", "fast", "fast-cl", "fast-cl-bf16", "compiled")


def _step_fn(impl: str, preset: str, batch: int):
    model = build(preset, "reference" if impl == "compiled" else impl, torch.device("cpu")).train()
    x = make_batch(model.cfg, batch, torch.device("cpu"))
    if "-cl" in impl:
        x = x.contiguous(memory_format=torch.channels_last)
    params = list(model.parameters())
    opt = build_optimizer(model, model.cfg, model.cfg.lr, torch.device("cpu"))
    forward = torch.compile(model) if impl == "compiled" else model

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=impl.endswith("-bf16")):
            out = forward(x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, model.cfg.grad_clip)
        opt.step()

    return step


def measure(a: argparse.Namespace) -> dict:
    kept = a.malloc == "kept" and memory.keep_freed_memory()  # off glibc or with MATNET_KEEP_FREED_MEMORY=0: not
    if a.threads:
        torch.set_num_threads(a.threads)
    impls = tuple(a.models.split(","))
    steps = {impl: _step_fn(impl, a.preset, a.batch) for impl in impls}
    for step in steps.values():  # warm-up (and compilation)
        step()
        step()
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for r in range(a.rounds):
        for impl in impls[r % len(impls):] + impls[:r % len(impls)]:
            t0 = time.perf_counter()
            steps[impl]()
            times[impl].append(time.perf_counter() - t0)
    res = {"malloc": "kept" if kept else "default", "threads": torch.get_num_threads(), "preset": a.preset,
           "batch": a.batch, "rounds": a.rounds, "median_ms": {i: 1e3 * statistics.median(t) for i, t in times.items()}}
    if "reference" in times:
        ref = times["reference"]
        res["ratio_to_reference"] = {i: statistics.median(r / t for r, t in zip(ref, ts)) for i, ts in times.items()}
    return res


def _print(res: dict) -> None:
    print(f"{res['preset']}, batch {res['batch']}, {res['threads']} threads, malloc {res['malloc']}, "
          f"{res['rounds']} interleaved rounds")
    print("| model | median step | reference / model (median over rounds) |\n|---|---:|---:|")
    for impl, ms in res["median_ms"].items():
        ratio = res.get("ratio_to_reference", {}).get(impl)
        print(f"| {impl} | {ms:.0f} ms | {'-' if ratio is None else f'{ratio:.2f}x'} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mnist")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--models", default="reference,fast-cl,fast-cl-bf16", help=f"comma-separated, of {IMPLS}")
    p.add_argument("--malloc", choices=("kept", "default"), default="kept")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    bad = set(a.models.split(",")) - set(IMPLS)
    if bad:
        p.error(f"--models: unknown {sorted(bad)}; choose from {IMPLS}")
    res = measure(a)
    _print(res)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
