"""Training: Adam with gradient clipping and the original schedule (constant, then linear decay),
skip-update on non-finite gradients, EMA weights, KL warm-up, JSON-lines metrics, atomic
checkpoints with exact resume, periodic IWAE evaluation and PNG outputs."""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import plots
from .checkpoint import load_checkpoint, save_checkpoint
from .config import MatNetConfig
from .data import BatchLoader, ImageDataset, load_dataset
from .model import MatNet

log = logging.getLogger("matnet.train")


@dataclass
class TrainOptions:
    out_dir: str = "runs/matnet"
    data_dir: str | None = None
    val_size: int | None = None  # images held out of the training set (default: the dataset's)
    device: str = "auto"
    steps: int | None = None  # default: cfg.steps
    seed: int = 0
    log_every: int = 50
    eval_every: int = 1000
    eval_images: int = 1000  # validation images for the ELBO
    iwae_k: int = 100
    iwae_images: int = 200  # validation images for the periodic IWAE bound
    ckpt_every: int = 500
    sample_every: int = 0  # 0: samples only at the end
    resume: bool = True
    fast: bool = False
    threads: int = 0  # torch CPU threads (0: torch's default)
    progress: bool = True


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    return dev


def lr_factor(step: int, total: int, decay_start: float, final: float) -> float:
    """Constant for the first `decay_start` fraction of training, then linear down to `final`."""
    start = int(decay_start * total)
    if step < start or total <= start:
        return 1.0
    return 1.0 - (1.0 - final) * min(1.0, (step - start) / (total - start))


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


@torch.no_grad()
def evaluate(model: MatNet, data: ImageDataset, n_images: int, iwae_k: int = 0, iwae_images: int = 0,
             batch_size: int = 100, seed: int = 1234, device: torch.device | None = None,
             progress: bool = False, chunk: int | None = None) -> dict:
    """ELBO on the first `n_images` of `data`, and the IWAE bound on the first `iwae_images`.

    Runs under a forked RNG with a fixed seed: results are reproducible and training's random
    stream is untouched (so resumed runs stay exact)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    res: dict = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        n = min(n_images, len(data))
        tot, kl_tot = 0.0, None
        for i in range(0, n, batch_size):
            x = data.to_float(data.images[i: min(n, i + batch_size)], generator=gen).to(device)
            out = model(x)
            tot += out.nll_bound.sum().item()
            kls = out.kl.sum(0)
            kl_tot = kls if kl_tot is None else kl_tot + kls
        res["elbo"] = tot / n
        res["kl_per_module"] = (kl_tot / n).tolist()
        if iwae_k and iwae_images:
            m = min(iwae_images, len(data))
            bs = max(1, min(batch_size, m))
            vals = []
            bar = tqdm(range(0, m, bs), desc=f"IWAE k={iwae_k}", disable=not progress, leave=False)
            for i in bar:
                x = data.to_float(data.images[i: min(m, i + bs)], generator=gen).to(device)
                vals.append(model.iwae_nll(x, k=iwae_k, chunk=chunk).double().cpu())
                bar.set_postfix(nll=f"{torch.cat(vals).mean().item():.2f}")
            res["iwae"] = torch.cat(vals).mean().item()
            res["iwae_k"] = iwae_k
            res["iwae_images"] = m
    model.train(was_training)
    return res


class Trainer:
    """Owns the model, optimizer, EMA copy, data stream and run directory."""

    def __init__(self, cfg: MatNetConfig, opts: TrainOptions):
        self.opts = opts
        self.out = Path(opts.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        if opts.threads:
            torch.set_num_threads(opts.threads)
        self.device = pick_device(opts.device)
        self.ckpt_path = self.out / "checkpoint.pt"
        resume = load_checkpoint(self.ckpt_path) if opts.resume and self.ckpt_path.exists() else None
        if resume is not None:  # the run's own config wins: everything below is built from it
            saved = MatNetConfig.from_dict(resume["config"])
            if saved.to_dict() != cfg.to_dict():
                log.warning("resuming %s: using the checkpoint's config, not the one given", self.ckpt_path)
            cfg = saved
        self.cfg = cfg
        # an explicit --steps may lengthen or shorten a resumed run; otherwise its own schedule holds
        self.total = opts.steps or (resume or {}).get("total_steps") or cfg.steps
        torch.manual_seed(opts.seed)
        kw = dict(seed=opts.seed, val_size=opts.val_size, image_size=cfg.image_size)
        self.train_data = load_dataset(cfg.dataset, "train", opts.data_dir, **kw)
        self.val_data = load_dataset(cfg.dataset, "val", opts.data_dir, **kw) if opts.val_size != 0 else None
        shape = self.train_data.shape
        want = (cfg.image_channels, cfg.image_size, cfg.image_size)
        if tuple(shape) != want:
            raise ValueError(f"dataset {cfg.dataset!r} has images of shape {tuple(shape)} "
                             f"but the config expects {want}")
        if opts.fast:
            from . import FastMatNet

            self.model: MatNet = FastMatNet(cfg).to(self.device)
        else:
            self.model = MatNet(cfg).to(self.device)
        self.ema = copy.deepcopy(self.model).eval() if cfg.ema_rate > 0 else None
        if self.ema is not None:
            self.ema.requires_grad_(False)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, betas=cfg.adam_betas)
        self.loader = BatchLoader(self.train_data, cfg.batch_size, shuffle=True, seed=opts.seed, device=self.device)
        self.step = 0
        self.skipped = 0
        if resume is not None:
            self.load_state(resume)
        self._trim_metrics()
        (self.out / "config.json").write_text(self.cfg.to_json())

    def _trim_metrics(self) -> None:
        """A fresh run starts a fresh log; a resumed one drops rows logged after its checkpoint."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        rows = [r for r in plots.read_metrics(path) if r.get("step", 0) <= self.step] if self.step else []
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    # ---- checkpointing ----
    def state(self) -> dict:
        return {
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.opt.state_dict(),
            "step": self.step,
            "skipped": self.skipped,
            "total_steps": self.total,
            "loader": self.loader.state_dict(),
            "rng": rng_state(),
        }

    def save(self) -> None:
        save_checkpoint(self.ckpt_path, self.state())

    def load_state(self, st: dict) -> None:
        self.model.load_state_dict(st["model"])
        if self.ema is not None:
            self.ema.load_state_dict(st["ema"] if st.get("ema") is not None else st["model"])
        self.opt.load_state_dict(st["optimizer"])  # moves the moments to the parameters' device
        self.step, self.skipped = st["step"], st.get("skipped", 0)
        self.loader.load_state_dict(st["loader"])
        set_rng_state(st["rng"])  # RNG states stay CPU byte tensors: the checkpoint is loaded on CPU
        log.info("resumed from %s at step %d", self.ckpt_path, self.step)

    # ---- one update ----
    def train_step(self, x: torch.Tensor) -> dict:
        cfg = self.cfg
        kl_w = min(1.0, (self.step + 1) / cfg.kl_warmup_steps) if cfg.kl_warmup_steps else 1.0
        lr = cfg.lr * lr_factor(self.step, self.total, cfg.lr_decay_start, cfg.lr_final)
        for g in self.opt.param_groups:
            g["lr"] = lr
        out = self.model(x, kl_weight=kl_w)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip).item()
        skip = not math.isfinite(gnorm) or (cfg.skip_threshold > 0 and gnorm > cfg.skip_threshold)
        if skip:  # VDVAE-style: a non-finite or huge gradient never reaches the weights
            self.skipped += 1
        else:
            self.opt.step()
            if self.ema is not None:
                with torch.no_grad():
                    for pe, p in zip(self.ema.parameters(), self.model.parameters()):
                        pe.lerp_(p, 1.0 - cfg.ema_rate)
        self.step += 1
        return {
            "loss": out.loss.item(),
            "nll_bound": out.nll_bound.mean().item(),
            "recon": out.recon_nll.mean().item(),
            "kl": out.kl.sum(1).mean().item(),
            "kl_per_module": out.kl.mean(0).tolist(),
            "grad_norm": gnorm,
            "lr": lr,
            "kl_weight": kl_w,
            "skipped": self.skipped,
        }

    def log_row(self, row: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def eval_model(self) -> MatNet:
        return self.ema if self.ema is not None else self.model

    def run(self, until: int | None = None) -> dict:
        """Train to the end of the schedule, or only up to step `until` (checkpointed, resumable)."""
        o = self.opts
        stop = min(self.total, until) if until is not None else self.total
        stream = self.loader.forever()
        bar = tqdm(total=self.total, initial=self.step, desc="train", disable=not o.progress, dynamic_ncols=True)
        t0, seen, last = time.time(), 0, {}
        while self.step < stop:
            row = self.train_step(next(stream))
            seen += self.cfg.batch_size
            bar.update(1)
            bar.set_postfix(nll=f"{row['nll_bound']:.2f}", kl=f"{row['kl']:.1f}")
            if self.step % o.log_every == 0 or self.step == self.total:
                dt = time.time() - t0
                self.log_row({"split": "train", "step": self.step, **row, "images_per_s": seen / max(dt, 1e-9),
                              "time": time.time()})
                t0, seen = time.time(), 0
            if o.eval_every and (self.step % o.eval_every == 0 or self.step == self.total):
                last = self.validate(o.iwae_k)
            if o.sample_every and self.step % o.sample_every == 0:
                self.save_samples(self.out / f"samples_{self.step:07d}.png")
            if self.step % o.ckpt_every == 0 or self.step == self.total:
                self.save()
        bar.close()
        self.save()
        if self.step < self.total:
            return last
        self.save_samples(self.out / "samples.png")
        self.save_plots()
        return last

    def validate(self, iwae_k: int) -> dict:
        o = self.opts
        if self.val_data is None:
            return {}
        res = evaluate(self.eval_model(), self.val_data, o.eval_images, iwae_k, o.iwae_images,
                       device=self.device)
        row = {"split": "val", "step": self.step, "val_elbo": res["elbo"],
               "elbo_images": min(o.eval_images, len(self.val_data)),
               "val_kl_per_module": res["kl_per_module"], "time": time.time()}
        if "iwae" in res:
            row.update(val_iwae=res["iwae"], iwae_k=res["iwae_k"], iwae_images=res["iwae_images"])
        self.log_row(row)
        tqdm.write(f"step {self.step}: val -ELBO {res['elbo']:.2f}"
                   + (f", IWAE(k={iwae_k}) {res['iwae']:.2f}" if "iwae" in res else "") + " nats")
        return row

    def save_samples(self, path: Path, n: int = 64) -> None:
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.opts.seed)
            x = self.eval_model().sample(n, mean=self.eval_model().dist.binary)
        plots.save_image_grid(x, path, signed=not self.eval_model().dist.binary)

    def save_plots(self) -> None:
        rows = plots.read_metrics(self.out / "metrics.jsonl")
        plots.plot_nll(rows, self.out / "nll.png")
        plots.plot_kl_per_module([r for r in rows if r.get("split") == "train"], self.model.kl_groups(),
                                 self.out / "kl_per_module.png")


def train(cfg: MatNetConfig, opts: TrainOptions) -> dict:
    """Train (or resume) a MatNet; returns the last validation row."""
    return Trainer(cfg, opts).run()
