"""The `matnet` command line: train, eval, sample."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

from .config import PRESETS, MatNetConfig


def _config_from_args(a: argparse.Namespace) -> MatNetConfig:
    over = {}
    if a.dataset:
        over["dataset"] = a.dataset
    for key in ("batch_size", "lr", "kl_warmup_steps", "ema_rate", "ar_layers", "channels"):
        v = getattr(a, key)
        if v is not None:
            over[key] = v
    for kv in a.set or []:
        k, _, v = kv.partition("=")
        over[k] = json.loads(v)
    return MatNetConfig.preset(a.preset, **over)


def cmd_train(a: argparse.Namespace) -> int:
    from .train import TrainOptions, train

    cfg = _config_from_args(a)
    opts = TrainOptions(out_dir=a.out, data_dir=a.data_dir, device=a.device, steps=a.steps, seed=a.seed,
                        eval_every=a.eval_every, eval_images=a.eval_images, iwae_k=a.iwae_k,
                        iwae_images=a.iwae_images, ckpt_every=a.ckpt_every, resume=not a.no_resume,
                        fast=a.fast, threads=a.threads, log_every=a.log_every, sample_every=a.sample_every,
                        val_size=a.val_size)
    res = train(cfg, opts)
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, list)}))
    print(f"outputs in {a.out}: checkpoint.pt metrics.jsonl nll.png samples.png kl_per_module.png")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint, load_model
    from .data import load_dataset
    from .train import evaluate, pick_device

    if a.threads:
        torch.set_num_threads(a.threads)
    dev = pick_device(a.device)
    model = load_model(a.checkpoint, dev, fast=a.fast, ema=not a.no_ema)
    cfg = model.cfg
    data = load_dataset(a.dataset or cfg.dataset, a.split, a.data_dir, val_size=a.val_size,
                        image_size=cfg.image_size)
    n = min(a.n_images or len(data), len(data))
    t = time.time()
    res = evaluate(model, data, n, a.k, min(a.iwae_images or n, n), batch_size=a.batch_size, seed=a.seed,
                   device=dev, progress=True, chunk=a.chunk)
    res["seconds"] = time.time() - t
    res["step"] = load_checkpoint(a.checkpoint).get("step")
    res.update(split=a.split, elbo_images=n, dataset=a.dataset or cfg.dataset)
    if cfg.likelihood != "bernoulli":
        bpd = 1.0 / (cfg.data_dims * math.log(2))
        res["elbo_bits_per_dim"] = res["elbo"] * bpd
        if "iwae" in res:
            res["iwae_bits_per_dim"] = res["iwae"] * bpd
    res.pop("kl_per_module", None)
    print(json.dumps(res))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))
    return 0


def cmd_sample(a: argparse.Namespace) -> int:
    from .checkpoint import load_model
    from .plots import save_image_grid
    from .train import pick_device

    torch.manual_seed(a.seed)
    model = load_model(a.checkpoint, pick_device(a.device), fast=a.fast)
    x = model.sample(a.n, temperature=a.temperature, mean=a.mean)
    save_image_grid(x, a.out, signed=not model.dist.binary)
    print(f"wrote {a.n} samples to {a.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="matnet", description="Matryoshka Networks: train, evaluate, sample.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
        q.add_argument("--data-dir", default=None, help="dataset folder (default: $MATNET_DATA_DIR)")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
        q.add_argument("--fast", action="store_true", help="use FastMatNet (the fused kernels)")

    t = sub.add_parser("train", help="train or resume a MatNet")
    common(t)
    t.add_argument("--preset", default="mnist", choices=sorted(PRESETS))
    t.add_argument("--dataset", default=None, help="mnist, fashion-mnist, omniglot, cifar10, folder")
    t.add_argument("--out", default="runs/matnet", help="run folder: checkpoint, metrics, PNGs")
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--channels", type=int, default=None)
    t.add_argument("--kl-warmup-steps", type=int, default=None)
    t.add_argument("--ema-rate", type=float, default=None)
    t.add_argument("--ar-layers", type=int, default=None)
    t.add_argument("--set", action="append", metavar="KEY=JSON", help="override any config field")
    t.add_argument("--eval-every", type=int, default=1000)
    t.add_argument("--eval-images", type=int, default=1000)
    t.add_argument("--iwae-k", type=int, default=100)
    t.add_argument("--iwae-images", type=int, default=200)
    t.add_argument("--ckpt-every", type=int, default=500)
    t.add_argument("--log-every", type=int, default=50)
    t.add_argument("--sample-every", type=int, default=0)
    t.add_argument("--val-size", type=int, default=None, help="training images held out for validation")
    t.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in --out")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="ELBO and IWAE bound of a checkpoint")
    common(e)
    e.add_argument("checkpoint")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--dataset", default=None)
    e.add_argument("--k", type=int, default=2500, help="importance samples (the paper: 2500)")
    e.add_argument("--chunk", type=int, default=None, help="samples per TD pass (memory)")
    e.add_argument("--n-images", type=int, default=None, help="images for the ELBO (default: all)")
    e.add_argument("--iwae-images", type=int, default=None, help="images for the IWAE bound (default: all)")
    e.add_argument("--batch-size", type=int, default=100)
    e.add_argument("--val-size", type=int, default=None, help="as given to train (for --split val)")
    e.add_argument("--no-ema", action="store_true")
    e.add_argument("--out", default=None, help="also write the result as JSON here")
    e.set_defaults(fn=cmd_eval)

    s = sub.add_parser("sample", help="write a PNG grid of samples")
    common(s)
    s.add_argument("checkpoint")
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--mean", action="store_true", help="show E[x|z] instead of a draw")
    s.add_argument("--out", default="samples.png")
    s.set_defaults(fn=cmd_sample)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return a.fn(a)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"matnet {a.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
