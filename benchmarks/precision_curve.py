"""bf16 autocast training validated against fp32, side by side.

    MATNET_DATA_DIR=../shared/datasets python benchmarks/precision_curve.py --preset mnist --steps 500 \\
        --out runs/precision

Two FastMatNet copies (channels_last, same initial weights) train on the same batches with the same noise
(the global seed is reset per step), one in fp32 and one under bf16 autocast (fp32 weights, optimizer state,
likelihood and KL). Reports the per-step losses, the largest gap between their 50-step running means, the
time per step of each, and the test IWAE bound of both models after the run (evaluated in fp32), and of the
fp32-trained model also under bf16 autocast (same noise), with the throughput of each. Writes curve.json and
curve.png into --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from matnet import FastMatNet, MatNetConfig
from matnet.data import load_dataset


def running_mean(v: list[float], w: int) -> list[float]:
    out, s = [], 0.0
    for i, x in enumerate(v):
        s += x - (v[i - w] if i >= w else 0.0)
        out.append(s / min(i + 1, w))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mnist")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--iwae-images", type=int, default=500)
    p.add_argument("--iwae-k", type=int, default=100)
    p.add_argument("--window", type=int, default=50)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=Path("runs/precision"))
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = MatNetConfig.preset(a.preset)
    train = load_dataset(cfg.dataset, "train")
    test = load_dataset(cfg.dataset, "test")
    torch.manual_seed(0)
    base = FastMatNet(cfg)
    models, opts = {}, {}
    for name in ("fp32", "bf16"):
        m = FastMatNet(cfg)
        m.load_state_dict(base.state_dict())
        models[name] = m.to(memory_format=torch.channels_last).train()
        opts[name] = torch.optim.Adam(m.parameters(), lr=cfg.lr, betas=cfg.adam_betas)
    losses = {n: [] for n in models}
    secs = {n: 0.0 for n in models}
    g = torch.Generator().manual_seed(1)
    for step in range(a.steps):
        idx = torch.randint(len(train), (a.batch_size,), generator=g)
        x = train.to_float(train.images[idx], generator=g).contiguous(memory_format=torch.channels_last)
        for name, m in models.items():
            torch.manual_seed(step)  # the same noise for both
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
                out = m(x)
            opts[name].zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), cfg.grad_clip)
            opts[name].step()
            secs[name] += time.perf_counter() - t0
            losses[name].append(out.loss.item())
        if (step + 1) % 50 == 0:
            print(f"step {step + 1}: fp32 {losses['fp32'][-1]:.2f}  bf16 {losses['bf16'][-1]:.2f} nats", flush=True)
    smooth = {n: running_mean(v, a.window) for n, v in losses.items()}
    gap = [abs(f - b) for f, b in zip(smooth["fp32"], smooth["bf16"])]
    xt = test.to_float(test.images[: a.iwae_images], generator=torch.Generator().manual_seed(2))
    iwae, iwae_s = {}, {}
    xt = xt.contiguous(memory_format=torch.channels_last)
    # each trained model in fp32; the fp32-trained one also under bf16 autocast (same noise: only precision differs)
    for name, m, bf16 in (("fp32", models["fp32"], False), ("bf16", models["bf16"], False),
                          ("fp32 model, bf16 eval", models["fp32"], True)):
        m.eval()
        torch.manual_seed(3)
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            iwae[name] = m.iwae_nll(xt, k=a.iwae_k).mean().item()
        iwae_s[name] = len(xt) * a.iwae_k / (time.perf_counter() - t0)
    result = {
        "preset": a.preset, "steps": a.steps, "batch_size": a.batch_size, "threads": torch.get_num_threads(),
        "window": a.window, "max_running_mean_gap_nats": max(gap),
        "final_running_mean": {n: v[-1] for n, v in smooth.items()},
        "s_per_step": {n: s / a.steps for n, s in secs.items()},
        "iwae": {"images": len(xt), "k": a.iwae_k, **iwae}, "iwae_images_x_samples_per_s": iwae_s,
        "losses": losses,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "curve.json").write_text(json.dumps(result))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, v in smooth.items():
        ax.plot(v, label=f"{name} ({a.window}-step mean)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.set_title(f"{a.preset}: fp32 vs bf16 autocast, max gap {max(gap):.2f} nats")
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.out / "curve.png", dpi=100)
    print(json.dumps({k: v for k, v in result.items() if k != "losses"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
