"""IWAE evaluation throughput on the CPU, side by side: the earlier default (2048 images per TD pass, NCHW, fp32)
against the per-device chunk of `MatNet.iwae_nll`, channels_last, and bf16 autocast.

    python benchmarks/iwae_throughput.py --preset mnist --batch 100 --k 100 [--rounds 2]

Every setting evaluates the same images with the same seed, so settings with the same chunk draw the same noise
and differ only by precision; the bound of each is printed beside its images x samples per second.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from matnet import FastMatNet, MatNetConfig
from matnet.model import IWAE_IMAGES_PER_PASS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mnist")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--rounds", type=int, default=2, help="timed rounds per setting (the best is kept)")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = MatNetConfig.preset(a.preset)
    torch.manual_seed(0)
    model = FastMatNet(cfg).eval()
    cl = FastMatNet(cfg).eval()
    cl.load_state_dict(model.state_dict())
    cl = cl.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(1)
    shape = (a.batch, cfg.image_channels, cfg.image_size, cfg.image_size)
    x = (torch.bernoulli(torch.rand(shape, generator=g), generator=g) if cfg.likelihood == "bernoulli"
         else torch.round(torch.rand(shape, generator=g) * 255) / 127.5 - 1)
    old_chunk = max(1, 2048 // a.batch)
    settings = [  # name, model, chunk, bf16
        ("before: 2048 images per pass, NCHW, fp32", model, old_chunk, False),
        (f"per-device chunk ({IWAE_IMAGES_PER_PASS['cpu']} images per pass), fp32", model, None, False),
        ("per-device chunk, channels_last, fp32", cl, None, False),
        ("per-device chunk, channels_last, bf16 autocast", cl, None, True),
    ]
    rows = []
    for name, m, chunk, bf16 in settings:
        best = float("inf")
        for _ in range(a.rounds):
            torch.manual_seed(2)
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                bound = m.iwae_nll(x, k=a.k, chunk=chunk).mean().item()
            best = min(best, time.perf_counter() - t0)
        rows.append({"setting": name, "bound": bound, "images_x_samples_per_s": a.batch * a.k / best})
        print(f"{name:52s} bound {bound:9.3f} nats  {a.batch * a.k / best:8.0f} images x samples/s", flush=True)
    base = rows[0]["images_x_samples_per_s"]
    for r in rows:
        r["speedup"] = r["images_x_samples_per_s"] / base
    print(json.dumps({"preset": a.preset, "batch": a.batch, "k": a.k, "threads": torch.get_num_threads(),
                      "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
