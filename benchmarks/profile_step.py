"""Where a training step spends its time: torch.profiler over a few steps of MatNet and FastMatNet.

    python benchmarks/profile_step.py --preset mnist --batch 100 --steps 3 [--device cuda]

Prints the top operators by self time for each model, and the share of convolution time.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import matnet


def _step(model, opt, x):
    out = model(x)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mnist")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args()
    cfg = matnet.MatNetConfig.preset(a.preset)
    shape = (a.batch, cfg.image_channels, cfg.image_size, cfg.image_size)
    x = torch.rand(shape, device=a.device)
    x = torch.bernoulli(x) if cfg.likelihood == "bernoulli" else torch.round(x * 255) / 127.5 - 1
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if a.device.startswith("cuda") else [])
    for cls in (matnet.MatNet, matnet.FastMatNet):
        torch.manual_seed(0)
        model = cls(cfg).to(a.device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        _step(model, opt, x)  # warm-up
        with profile(activities=acts) as prof:
            for _ in range(a.steps):
                _step(model, opt, x)
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
        key = "self_device_time_total" if a.device.startswith("cuda") else "self_cpu_time_total"
        events = prof.key_averages()
        total = sum(getattr(e, key) for e in events)
        conv = sum(getattr(e, key) for e in events if "conv" in e.key or "mkldnn" in e.key)
        print(f"\n== {cls.__name__} ({a.preset}, batch {a.batch}, {a.device}): {total / 1e3 / a.steps:.1f} ms "
              f"of operator self time per step; convolutions {100 * conv / max(total, 1):.0f}%")
        print(events.table(sort_by=key, row_limit=a.top))


if __name__ == "__main__":
    main()
