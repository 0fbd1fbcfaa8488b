"""The `matnet` command line: train, eval, sample, inpaint, cluster.

Every flag is generated from a dataclass field (TrainOptions, EvalOptions, SampleOptions and the
MatNetConfig fields in CONFIG_FLAGS), so defaults and help live in one place. Every user error
ends in one line on stderr and a non-zero exit code (see `main`)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch

from . import distributed
from .checkpoint import atomic_write_text
from .config import PRESETS, MatNetConfig, check_field_types, field_default
from .masks import SPEC_FORMS, parse_mask_spec
from .memory import keep_freed_memory
from .train import EXIT_DIVERGED, EXIT_TIME_LIMIT, EXIT_USAGE, PRECISIONS, TrainOptions, check_seed, strict_json

log = logging.getLogger("matnet.cli")

# config fields with a flag of their own (any field can be set with --set KEY=JSON)
MAX_GRID_COLUMNS = 100  # inpaint --n: one grid row holds n + 2 images; wider PNGs are refused by viewers
MAX_SAMPLES = MAX_GRID_COLUMNS**2  # sample --n: a square grid of at most 100 x 100
SAMPLE_CHUNK = 256  # samples drawn per generation pass (memory)
DEFAULT_INPAINT_ROWS = 8
CONFIG_FLAGS = ("dataset", "batch_size", "lr", "channels", "kl_warmup_steps", "ema_rate", "ar_layers")
# TrainOptions fields that eval and sample take too
COMMON = ("device", "data_dir", "seed", "threads", "ops")
# the commands that run as one job under torchrun (each rank its share); the others are single-process
DISTRIBUTED_COMMANDS = ("train", "eval")
# exit codes of outcomes that every rank reaches together (done, diverged, time limit, SIGINT, SIGTERM)
SHARED_EXITS = (0, EXIT_DIVERGED, EXIT_TIME_LIMIT, 128 + signal.SIGINT, 128 + signal.SIGTERM)


def _f(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


VAL_SIZE_HELP = ("training images held out for validation, >= 0, for --split train or val (default: as many as the "
                 "checkpoint's run held out)")


@dataclass
class EvalOptions:
    checkpoint: str = _f("", "checkpoint.pt to evaluate", positional=True)
    split: str = _f("test", "dataset split", choices=("train", "val", "test"))
    dataset: str | None = _f(None, "dataset (default: the checkpoint's)")
    k: int = _f(2500, "importance samples of the IWAE bound (the paper: 2500; 0: no IWAE bound)")
    chunk: int | None = _f(None, "samples per TD pass, >= 1 (memory)")
    n_images: int | None = _f(None, "images for the ELBO, >= 1 (default: all)")
    iwae_images: int | None = _f(None, "images for the IWAE bound (default: as many as the ELBO; 0: no IWAE bound)")
    batch_size: int = _f(100, "images per batch, >= 1")
    val_size: int | None = _f(None, VAL_SIZE_HELP)
    ema: bool = _f(True, "use the EMA weights where the checkpoint has them")
    out: str | None = _f(None, "also write the result as JSON here")
    mask: str | None = _f(None, "inpainting checkpoints: the test masks' spec (default: the checkpoint's)")
    mask_seed: int = _f(0, "inpainting checkpoints: seed of the fixed test masks, >= 0")
    finetune_inference_epochs: int = _f(0, "then fine-tune only the inference network for this many epochs on the "
                                           "evaluated images and report the bounds again as *_finetuned (the "
                                           "original code: 199; 0: off); the checkpoint is not changed")
    finetune_lr: float = _f(3e-5, "Adam learning rate of that fine-tuning, > 0 (the original: 1e-5 to 3e-5)")
    precision: str = _f("fp32", "fp32, or autocast of the evaluation passes to bf16 or fp16 (faster: bf16 on CPUs "
                                "with AVX-512 BF16 or AMX, and on GPUs); likelihoods, KL and the bounds' sums stay "
                                "fp32, and the JSON records the precision (fine-tuning runs in fp32)",
                        choices=tuple(PRECISIONS))
    channels_last: bool = _f(False, "weights and feature maps in channels_last memory format (faster on CPUs)")

    def __post_init__(self) -> None:
        check_field_types(self)
        _at_least(self, {"n_images": 1, "batch_size": 1, "chunk": 1, "k": 0, "iwae_images": 0, "val_size": 0,
                         "mask_seed": 0, "finetune_inference_epochs": 0})
        if self.mask is not None:
            parse_mask_spec(self.mask)
        if not (math.isfinite(self.finetune_lr) and 0 < self.finetune_lr <= 1):
            raise ValueError(f"--finetune-lr must be a number in (0, 1], got {self.finetune_lr}")
        if self.finetune_lr != field_default("finetune_lr", EvalOptions) and not self.finetune_inference_epochs:
            raise ValueError("--finetune-lr needs --finetune-inference-epochs N (fine-tuning is off by default)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        _check_val_size(self)
        _check_out(self.out)


@dataclass
class SampleOptions:
    checkpoint: str = _f("", "checkpoint.pt to sample from", positional=True)
    n: int = _f(64, f"number of samples, 1 to {MAX_SAMPLES}")
    temperature: float = _f(1.0, "prior temperature, > 0")
    mean: bool = _f(False, "show E[x|z] instead of a draw")
    out: str = _f("samples.png", "PNG grid to write")

    def __post_init__(self) -> None:
        check_field_types(self)
        _at_least(self, {"n": 1})
        if self.n > MAX_SAMPLES:
            raise ValueError(f"--n must be <= {MAX_SAMPLES} (a grid of {MAX_GRID_COLUMNS} x {MAX_GRID_COLUMNS}), "
                             f"got {self.n}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"--temperature must be a finite number > 0, got {self.temperature}")
        _check_out(self.out, image=True)


@dataclass
class InpaintOptions:
    checkpoint: str = _f("", "inpainting checkpoint.pt (trained with --task inpaint)", positional=True)
    n: int = _f(8, "imputations per image, >= 1")
    images: int | None = _f(None, f"images (grid rows), >= 1 (default: {DEFAULT_INPAINT_ROWS}, or all of a smaller "
                                  "folder or split)")
    mask: str | None = _f(None, f"mask spec, one of {SPEC_FORMS} (default: the checkpoint's)")
    out: str = _f("inpaint.png", "PNG grid to write: per row the original, the occluded input, the imputations")
    dataset: str | None = _f(None, "dataset to take images from (default: the checkpoint's)")
    split: str = _f("test", "dataset split", choices=("train", "val", "test"))
    val_size: int | None = _f(None, VAL_SIZE_HELP)
    folder: str | None = _f(None, "take the images from this folder of image files (CelebA-style JPEG/PNG) "
                                  "instead, resized and centre-cropped to the model's size")
    temperature: float = _f(1.0, "prior temperature, > 0")
    mean: bool = _f(False, "show E[x|z] at the missing pixels instead of a draw")
    ema: bool = _f(True, "use the EMA weights where the checkpoint has them")

    def __post_init__(self) -> None:
        check_field_types(self)
        _at_least(self, {"n": 1, "images": 1, "val_size": 0})
        if self.n > MAX_GRID_COLUMNS:
            raise ValueError(f"--n must be <= {MAX_GRID_COLUMNS} (one grid row per image), got {self.n}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"--temperature must be a finite number > 0, got {self.temperature}")
        if self.mask is not None:
            parse_mask_spec(self.mask)
        if self.folder is not None and not self.folder.strip():
            raise ValueError("--folder is empty: give a folder of image files")
        if self.folder is not None and self.dataset is not None:
            raise ValueError("give --folder or --dataset, not both")
        if self.folder is not None and self.split != field_default("split", InpaintOptions):
            raise ValueError("give --folder or --split, not both (a folder has no splits)")
        _check_val_size(self)
        _check_out(self.out, image=True)


@dataclass
class ClusterOptions:
    checkpoint: str = _f("", "checkpoint.pt of a model with a mixture prior on z0 (any density model with --kmeans)",
                         positional=True)
    out: str = _f("clusters.png", "PNG grid to write: one row of images per mixture component (or cluster)")
    kmeans: int = _f(0, "K >= 1: cluster the posterior means E[z0 | x] by k-means (best of 10 seeded restarts) "
                        "into K clusters instead of by the mixture's components: a baseline, for any density model")
    dataset: str | None = _f(None, "dataset (default: the checkpoint's)")
    split: str = _f("test", "dataset split", choices=("train", "val", "test"))
    val_size: int | None = _f(None, VAL_SIZE_HELP)
    n_images: int | None = _f(None, "images to cluster, >= 1 (default: all)")
    ema: bool = _f(True, "use the EMA weights where the checkpoint has them")

    def __post_init__(self) -> None:
        check_field_types(self)
        _at_least(self, {"n_images": 1, "kmeans": 0, "val_size": 0})
        _check_val_size(self)
        _check_out(self.out, image=True)


def _check_val_size(o: EvalOptions | InpaintOptions | ClusterOptions) -> None:
    if o.val_size is not None and o.split == "test":
        raise ValueError("--val-size splits the training images (--split train or val); it has no effect on "
                         "--split test")


def _run_val_size(o: EvalOptions | InpaintOptions | ClusterOptions, cfg: MatNetConfig) -> int | None:
    """--val-size for --split train or val: as given, else what the checkpoint's run held out of its dataset (the
    dataset's default for another dataset, or a checkpoint that does not record it: then said)."""
    if o.val_size is not None or o.split == "test" or (o.dataset or cfg.dataset) != cfg.dataset:
        return o.val_size
    from .checkpoint import load_checkpoint

    recorded = load_checkpoint(o.checkpoint).get("val_size")
    if recorded is None and distributed.is_main():
        log.warning("%s does not record its training run's --val-size: --split %s takes the dataset's default "
                    "hold-out (give --val-size as given to train)", o.checkpoint, o.split)
    return recorded


def _check_out(path: str | None, image: bool = False) -> None:
    """--out names a file (an image PIL can write, with `image`); missing folders above it are created when
    writing."""
    if path is None:
        return
    p = Path(path)
    if not path.strip():
        raise ValueError("--out is empty: give a file path")
    if p.is_dir() or path.endswith(("/", os.sep)):
        raise ValueError(f"--out {path!r} is a folder; give a file path" + (" such as grid.png" if image else ""))
    if any(q.exists() and not q.is_dir() for q in p.parents):
        raise ValueError(f"--out {path!r}: a folder on its path is a file")
    if image:
        from .plots import image_format

        image_format(path)


def _counts(o: EvalOptions, have: int) -> tuple[int, int]:
    """(ELBO images, IWAE images) of an eval: all by default; more than there are is an error, not a silent cut."""
    n = _image_count("--n-images", o.n_images, have, f"the {o.split} split")
    if o.iwae_images is not None and o.iwae_images > n:
        of = f"the {o.split} split" if o.n_images is None else "the ELBO (--n-images)"
        raise ValueError(f"--iwae-images {o.iwae_images} is more than the {n} images of {of}")
    return n, n if o.iwae_images is None else o.iwae_images


def _image_count(flag: str, asked: int | None, have: int, source: str) -> int:
    if asked is not None and asked > have:
        raise ValueError(f"{flag} {asked} is more than the {have} images of {source}")
    return have if asked is None else asked


def _at_least(opts: Any, lows: dict[str, int]) -> None:
    for name, low in lows.items():
        v = getattr(opts, name)
        if v is not None and v < low:
            zero_is_off = ("k", "iwae_images", "finetune_inference_epochs", "kmeans")
            off = " (0: off)" if low == 0 and name in zero_is_off else ""
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}{off}, got {v}")


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def _base_type(tp: Any) -> Any:
    """`int | None` -> int."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) is not None and len(args) == 1 else tp


def add_fields(p: argparse.ArgumentParser, cls: type, only: tuple[str, ...] | None = None,
               skip: tuple[str, ...] = ()) -> None:
    """One flag per dataclass field: its default, type and help come from the field."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if (only is not None and f.name not in only) or f.name in skip:
            continue
        tp, help = _base_type(hints[f.name]), f.metadata.get("help", "")
        if tp is bool:
            name = _flag(f) if not f.default else "--no-" + f.name.replace("_", "-")
            p.add_argument(name, dest=f.name, action="store_false" if f.default else "store_true",
                           help=help if not f.default else f"do not: {help}")
        elif f.metadata.get("positional"):
            p.add_argument(f.name, type=tp, help=help)
        else:
            p.add_argument(_flag(f), dest=f.name, type=tp, default=f.default, choices=f.metadata.get("choices"),
                           help=f"{help} [{f.default}]" if f.default is not None else help)
        if "alias" in f.metadata:  # a deprecated flag kept working: it sets the field to one value
            alias, value = f.metadata["alias"]
            p.add_argument(alias, dest=f.name, action="store_const", const=value, help=argparse.SUPPRESS)


def from_args(cls: type, a: argparse.Namespace, **kw: Any) -> Any:
    return cls(**{f.name: getattr(a, f.name) for f in dataclasses.fields(cls) if hasattr(a, f.name)}, **kw)


def _config_from_args(a: argparse.Namespace) -> MatNetConfig:
    over = {k: getattr(a, "cfg_" + k) for k in CONFIG_FLAGS if getattr(a, "cfg_" + k) is not None}
    for kv in a.set or []:
        k, eq, v = kv.partition("=")
        if not eq or not k:
            raise ValueError(f"--set {kv!r}: expected KEY=JSON")
        try:
            over[k] = json.loads(v)
        except json.JSONDecodeError as e:
            raise ValueError(f"--set {k}: {v!r} is not JSON ({e.msg}); a string needs quotes: "
                             f"--set {k}='\"text\"'") from e
    return MatNetConfig.preset(a.preset, **over)


def _threads(n: int) -> None:
    if n < 0:
        raise ValueError(f"--threads must be >= 0 (0: torch's default), got {n}")
    if n:
        torch.set_num_threads(n)


def _agreed(what: str, fn: typing.Callable[[], Any]) -> Any:
    """fn() on every rank of a torchrun job, then a collective: a failure on any rank stops all of them, and
    a failure alike on every rank (bad options) is said once, by rank 0."""
    err, out = None, None
    try:
        out = fn()
    except Exception as e:  # every kind: a rank must not leave the others waiting in the collective
        err = e
    distributed.agree(err, what)
    return out


def cmd_train(a: argparse.Namespace) -> int:
    from .train import train

    cfg, opts = _agreed("reading the options", lambda: (_config_from_args(a), from_args(TrainOptions, a)))
    res = train(cfg, opts)
    if distributed.is_main():
        print(json.dumps(strict_json({k: v for k, v in res.items() if not isinstance(v, list)})))
        names = ("checkpoint.pt", "metrics.jsonl", "nll.png", "samples.png", "kl_per_module.png")
        print(f"outputs in {opts.out_dir}: {' '.join(n for n in names if (Path(opts.out_dir) / n).exists())}")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from .checkpoint import load_model
    from .train import TrainingDiverged, evaluate, pick_device

    def options() -> tuple[EvalOptions, torch.device]:
        o = from_args(EvalOptions, a)
        _threads(a.threads)
        return o, distributed.rank_device(pick_device(a.device))  # under torchrun: the images split over the ranks

    o, dev = _agreed("reading the options", options)

    def task() -> str:  # the checkpoint's task, and the options that do not fit it
        kind = _task_of(o.checkpoint)
        if kind == "inpaint" and o.finetune_inference_epochs:
            raise ValueError("--finetune-inference-epochs is for density checkpoints, not inpainting ones")
        if kind != "inpaint" and o.finetune_inference_epochs and distributed.world() > 1:
            raise ValueError("--finetune-inference-epochs runs in one process: launch this eval without torchrun")
        if kind != "inpaint" and (o.mask is not None or o.mask_seed != field_default("mask_seed", EvalOptions)):
            flag = "--mask" if o.mask is not None else "--mask-seed"
            raise ValueError(f"{flag} is for inpainting checkpoints; {o.checkpoint} is a density model")
        return kind

    if _agreed("reading the checkpoint", task) == "inpaint":
        return _eval_inpaint(o, a, dev)

    def setup() -> tuple:
        model = _in_layout(load_model(o.checkpoint, dev, fast=a.fast, ema=o.ema), o)
        data = _model_data(o.dataset or model.cfg.dataset, o.split, a, model.cfg, model.dist.binary,
                           val_size=_run_val_size(o, model.cfg))
        return (model, data, *_counts(o, len(data)))

    model, data, n, m = _agreed("setting up", setup)
    cfg = model.cfg
    t = time.time()
    res = _scored(o, dev, lambda: evaluate(model, data, n, o.k, m, batch_size=o.batch_size, seed=a.seed, device=dev,
                                           progress=True, chunk=o.chunk))
    res["elbo_images"] = n
    if o.finetune_inference_epochs:  # on a copy of the model: the checkpoint and `model` stay as they are
        from .finetune import finetune_inference

        tuned = finetune_inference(model, data, n, o.finetune_inference_epochs, o.finetune_lr, o.batch_size,
                                   seed=a.seed, device=dev, progress=True)
        res.update(finetune_inference_epochs=o.finetune_inference_epochs, finetune_lr=o.finetune_lr,
                   finetune_images=n)
        # in the precision of the bound it is compared with
        elbo = _scored(o, dev, lambda: evaluate(tuned, data, n, 0, 0, batch_size=o.batch_size, seed=a.seed,
                                                device=dev))["elbo"]
        if not math.isfinite(elbo):  # before the long IWAE pass; the plain bounds are kept
            _emit(_eval_result(res, o, cfg, t, finetune_diverged=True), o.out)
            raise TrainingDiverged(f"fine-tuning the inference network diverged (ELBO {elbo}); the bounds without "
                                   f"it are above; try a smaller --finetune-lr than {o.finetune_lr} (the original: "
                                   "1e-5 to 3e-5)")
        if elbo > res["elbo"] + 0.01:  # it minimised this very -ELBO on these images: worse means too large a step
            log.warning("fine-tuning made the -ELBO worse by %.3f nats (%.3f -> %.3f): --finetune-lr %g is likely "
                        "too large (the original: 1e-5 to 3e-5)", elbo - res["elbo"], res["elbo"], elbo,
                        o.finetune_lr)
        ft = _scored(o, dev, lambda: evaluate(tuned, data, n, o.k, m, batch_size=o.batch_size, seed=a.seed,
                                              device=dev, progress=True, chunk=o.chunk))
        res.update({f"{key}_finetuned": ft[key] for key in ("elbo", "iwae") if key in ft})
        res["bounds"] = ("elbo, iwae: the checkpoint's model; elbo_finetuned, iwae_finetuned: the same generator "
                         "with its inference network fine-tuned on these images first")
    _emit(_eval_result(res, o, cfg, t), o.out)
    return 0


def _in_layout(model: torch.nn.Module, o: EvalOptions) -> torch.nn.Module:
    """The loaded model in --channels-last's layout (its feature maps follow its conv weights)."""
    return model.to(memory_format=torch.channels_last) if o.channels_last else model


def _autocast(o: EvalOptions, dev: torch.device) -> contextlib.AbstractContextManager:
    """--precision's autocast (a no-op for fp32)."""
    dtype = PRECISIONS[o.precision]
    return torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None)


class LowPrecisionOverflow(ValueError):
    """A bound came out non-finite under --precision bf16 or fp16 (a user error: exit 2)."""

    same_on_all_ranks = True  # decided on all-reduced bounds: rank 0 says it


def _scored(o: EvalOptions, dev: torch.device, score: typing.Callable[[], dict]) -> dict:
    """score() under --precision's autocast. A low-precision bound that is not finite is an error that names the
    fix, not a null in the JSON."""
    with _autocast(o, dev):
        res = score()
    bad = [k for k in ("elbo", "iwae") if k in res and not math.isfinite(res[k])]
    if bad and o.precision != "fp32":
        said = f"the {bad[0]} bound is" if len(bad) == 1 else f"the {' and '.join(bad)} bounds are"
        raise LowPrecisionOverflow(f"{said} not finite under --precision {o.precision} "
                                   "(an overflow in low precision); evaluate with --precision fp32")
    return res


def _eval_result(res: dict, o: EvalOptions, cfg: MatNetConfig, t0: float, **more: Any) -> dict:
    """`matnet eval`'s JSON for a density checkpoint: the bounds in `res` with the run's facts and bits/dim."""
    from .checkpoint import load_checkpoint

    res = {k: v for k, v in res.items() if k != "kl_per_module"}
    res.update(more, seconds=time.time() - t0, step=load_checkpoint(o.checkpoint).get("step"), split=o.split,
               dataset=o.dataset or cfg.dataset, precision=o.precision)
    if cfg.likelihood != "bernoulli":
        bpd = 1.0 / (cfg.data_dims * math.log(2))
        for key in ("elbo", "iwae", "elbo_finetuned", "iwae_finetuned"):
            if key in res:
                res[key + "_bits_per_dim"] = res[key] * bpd
    return res


def cmd_sample(a: argparse.Namespace) -> int:
    from .checkpoint import load_model
    from .plots import save_image_grid
    from .train import pick_device

    o: SampleOptions = from_args(SampleOptions, a)
    _threads(a.threads)
    if _task_of(o.checkpoint) == "inpaint":
        raise ValueError(f"{o.checkpoint} is an inpainting model (p(x^u | x^k)): use matnet inpaint")
    torch.manual_seed(a.seed)
    model = load_model(o.checkpoint, pick_device(a.device), fast=a.fast)
    x = torch.cat([model.sample(min(SAMPLE_CHUNK, o.n - i), temperature=o.temperature, mean=o.mean).cpu()
                   for i in range(0, o.n, SAMPLE_CHUNK)])
    save_image_grid(x, o.out, signed=not model.dist.binary)
    print(f"wrote {o.n} samples to {o.out}")
    return 0


def _emit(res: dict, out: str | None) -> None:
    """Print a result as one JSON line (and write it to `out` when given); rank 0's job under torchrun."""
    if not distributed.is_main():
        return
    res = strict_json(res)
    print(json.dumps(res))
    if out:
        atomic_write_text(out, json.dumps(res, indent=2))


def _task_of(path: str) -> str:
    from .checkpoint import load_checkpoint
    from .inpaint import checkpoint_task

    return checkpoint_task(load_checkpoint(path))


def _eval_inpaint(o: EvalOptions, a: argparse.Namespace, dev: torch.device) -> int:
    """`matnet eval` of an inpainting checkpoint: the imputation NLL, -log p(x^u | x^k) in nats per image over the
    missing pixels (Eq. 6 bound and IWAE bound), on fixed masks seeded with --mask-seed."""
    from .inpaint import evaluate_inpaint, load_inpaint_model

    def setup() -> tuple:
        model, meta = load_inpaint_model(o.checkpoint, dev, fast=a.fast, ema=o.ema)
        cfg = model.cfg
        gen = parse_mask_spec(o.mask or meta["mask"], (cfg.image_size, cfg.image_size))
        data = _model_data(o.dataset or cfg.dataset, o.split, a, cfg, model.dist.binary, val_size=_run_val_size(o, cfg))
        return (_in_layout(model, o), meta, gen, data, *_counts(o, len(data)))

    model, meta, gen, data, n, m = _agreed("setting up", setup)
    cfg = model.cfg
    t = time.time()
    r = _scored(o, dev, lambda: evaluate_inpaint(model, data, gen, n, o.k, m, batch_size=o.batch_size, seed=a.seed,
                                                 mask_seed=o.mask_seed, device=dev, progress=True, chunk=o.chunk))
    res = {"task": "inpaint", "nll_of": "missing pixels (nats per image)", "imputation_elbo": r["elbo"]}
    if "iwae" in r:
        res.update(imputation_iwae=r["iwae"], iwae_k=r["iwae_k"], iwae_images=r["iwae_images"],
                   iwae_missing_pixels_per_image=r["iwae_missing_pixels_per_image"])
    res.update(mask=r["mask"], mask_seed=o.mask_seed, missing_pixels_per_image=r["missing_pixels_per_image"],
               seconds=time.time() - t, step=meta["step"], split=o.split, elbo_images=n,
               dataset=o.dataset or cfg.dataset, precision=o.precision)
    if cfg.likelihood != "bernoulli":  # bits per missing dimension, each bound over its own images' masks
        for key, pixels in (("imputation_elbo", "missing_pixels_per_image"),
                            ("imputation_iwae", "iwae_missing_pixels_per_image")):
            dims = res.get(pixels, 0) * cfg.image_channels
            if key in res and dims > 0:
                res[key + "_bits_per_dim"] = res[key] / (dims * math.log(2))
    _emit(res, o.out)
    return 0


def _grey(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB [N, 3, H, W] -> uint8 grey [N, 1, H, W] (ITU-R 601 luma)."""
    w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)


def _model_data(dataset: str, split: str, a: argparse.Namespace, cfg: MatNetConfig, binary: bool,
                folder: str | None = None, val_size: int | None = None) -> Any:
    """A dataset split, or image files (`folder`, or the "folder" dataset) resized to the model's size, made grey
    for a one-channel model and binarized for a binary one; any other shape mismatch is refused."""
    from .data import FIXED_BINARIZE_SEED, ImageDataset, load_dataset, load_image_folder

    if folder is None and dataset != "folder":
        data = load_dataset(dataset, split, a.data_dir, val_size=val_size, image_size=cfg.image_size,
                            binarize=cfg.binarize)
    else:
        images = (load_image_folder(folder, cfg.image_size).load_all() if folder is not None else
                  load_dataset("folder", split, a.data_dir, val_size=val_size, image_size=cfg.image_size,
                               binarize=None).images)
        images = _grey(images) if cfg.image_channels == 1 and images.shape[1] == 3 else images
        mode = cfg.binarize if binary and cfg.binarize != "auto" else "dynamic" if binary else None
        data = ImageDataset(images, binarize=mode, seed=FIXED_BINARIZE_SEED if mode == "fixed" else a.seed)
    want = (cfg.image_channels, cfg.image_size, cfg.image_size)
    if tuple(data.shape) != want:
        raise ValueError(f"the images have shape {tuple(data.shape)} but the model expects {want}")
    return data


def cmd_inpaint(a: argparse.Namespace) -> int:
    from .inpaint import load_inpaint_model
    from .masks import fixed_masks
    from .plots import save_inpaint_grid
    from .train import pick_device

    o: InpaintOptions = from_args(InpaintOptions, a)
    _threads(a.threads)
    dev = pick_device(a.device)
    model, meta = load_inpaint_model(o.checkpoint, dev, fast=a.fast, ema=o.ema)
    cfg = model.cfg
    gen = parse_mask_spec(o.mask or meta["mask"], (cfg.image_size, cfg.image_size))
    data = _model_data(o.dataset or cfg.dataset, o.split, a, cfg, model.dist.binary, o.folder, _run_val_size(o, cfg))
    g = torch.Generator().manual_seed(a.seed)
    n = (min(DEFAULT_INPAINT_ROWS, len(data)) if o.images is None else
         _image_count("--images", o.images, len(data), o.folder or f"the {o.split} split"))
    pick = torch.randperm(len(data), generator=g)[:n].sort().values  # --seed picks the images, masks and draws
    x = data.to_float(data.images[pick], generator=g).to(dev)
    m = fixed_masks(gen, n, cfg.image_size, cfg.image_size, seed=a.seed, device=dev)
    torch.manual_seed(a.seed)
    imp = model.impute(x, m, o.n, temperature=o.temperature, mean=o.mean)
    save_inpaint_grid(x, m, imp, o.out, signed=not model.dist.binary)
    print(f"wrote {o.out}: {n} rows of original, occluded ({gen.spec}) and {o.n} imputations")
    return 0


def cmd_cluster(a: argparse.Namespace) -> int:
    from . import clustering
    from .checkpoint import load_model
    from .train import pick_device

    o: ClusterOptions = from_args(ClusterOptions, a)
    _threads(a.threads)
    if _task_of(o.checkpoint) != "density":
        raise ValueError(f"{o.checkpoint} is an inpainting model; cluster needs a density model")
    model = load_model(o.checkpoint, pick_device(a.device), fast=a.fast, ema=o.ema)
    prior = model.cfg.prior
    if prior != "gmm" and not o.kmeans:
        raise ValueError(f"{o.checkpoint} has no mixture prior on z0 (prior {prior!r}); cluster needs a model "
                         "trained with --set prior='\"gmm\"', or --kmeans K")
    cfg = model.cfg
    dataset = o.dataset or cfg.dataset
    data = _model_data(dataset, o.split, a, cfg, model.dist.binary, val_size=_run_val_size(o, cfg))
    n = _image_count("--n-images", o.n_images, len(data), f"the {o.split} split")
    if o.kmeans > n:
        raise ValueError(f"--kmeans {o.kmeans} needs at least as many images, got {n} (--n-images, or the split)")
    x = data.to_float(data.images[:n], generator=torch.Generator().manual_seed(a.seed))
    labels = data.labels[:n] if dataset != "folder" else None  # image folders carry no labels
    n_classes = None if labels is None else int(data.labels.max()) + 1  # the whole split's, not the subset's
    res = clustering.cluster_report(model, x, labels=labels, out_png=o.out, n_classes=n_classes, kmeans_k=o.kmeans,
                                    seed=a.seed)
    _emit({**res, "images": n, "split": o.split, "dataset": dataset, "out": o.out}, None)
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (and exit 2), like every other user error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="matnet", description="Matryoshka Networks: train, evaluate, sample, inpaint, cluster.",
                epilog="exit codes: 0 done; 2 a user error; 3 training diverged (last good checkpoint kept); "
                       "4 disk full; 5 stopped before --time-limit after writing a checkpoint; "
                       "130 / 143 stopped by SIGINT / SIGTERM (train: after writing a checkpoint)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train or resume a MatNet")
    t.add_argument("--preset", default="mnist", choices=sorted(PRESETS))
    hints = typing.get_type_hints(MatNetConfig)
    for k in CONFIG_FLAGS:
        t.add_argument("--" + k.replace("_", "-"), dest="cfg_" + k, type=_base_type(hints[k]), default=None,
                       metavar=k.upper(), help=f"config field {k} (default: the preset's)")
    t.add_argument("--set", action="append", metavar="KEY=JSON", help="override any config field")
    add_fields(t, TrainOptions)
    t.set_defaults(fn=cmd_train)

    for name, options, fn, text in (
            ("eval", EvalOptions, cmd_eval, "ELBO and IWAE bound of a checkpoint"),
            ("sample", SampleOptions, cmd_sample, "write a PNG grid of samples"),
            ("inpaint", InpaintOptions, cmd_inpaint, "write a PNG grid of imputations (paper Fig. 5)"),
            ("cluster", ClusterOptions, cmd_cluster,
             "mixture-prior models: images per component (Fig. 3) and clustering accuracy")):
        q = sub.add_parser(name, help=text)
        add_fields(q, options)
        add_fields(q, TrainOptions, only=COMMON)
        q.set_defaults(fn=fn)
    return p


def _resolve_ops(a: argparse.Namespace) -> None:
    """eval, sample, inpaint and cluster take --ops too: `a.fast` is whether their model runs the fused ops."""
    if hasattr(a, "ops"):
        from .train import pick_device, use_fast_ops

        a.fast = use_fast_ops(a.ops, pick_device(a.device))


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit codes: 0 done; 2 a user error (one line on stderr); 3 training diverged;
    4 disk full; 5 stopped before --time-limit after a checkpoint; 128 + signal (130 SIGINT, 143 SIGTERM):
    train stopped after a checkpoint, any other command stopped at once."""
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(name)s: %(message)s")
    with distributed.session(a.device) if a.cmd in DISTRIBUTED_COMMANDS else contextlib.nullcontext():
        code, shared = _run(a)
        distributed.settle(shared)
        return code


class Terminated(KeyboardInterrupt):
    """SIGTERM where no training loop catches it (a training loop checkpoints instead): ends the command as
    Ctrl-C does, with one line and exit 143 rather than a silent kill."""


@contextlib.contextmanager
def _sigterm_interrupts() -> typing.Iterator[None]:
    def stop(signum: int, frame: Any) -> NoReturn:
        raise Terminated

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _run(a: argparse.Namespace) -> tuple[int, bool]:
    """The command's exit code, and whether every rank shares that outcome (then they leave together)."""
    try:
        if keep_freed_memory():
            log.info("freed CPU memory is kept for reuse (glibc malloc; MATNET_KEEP_FREED_MEMORY=0 turns it off)")
        _agreed("reading the options", lambda: (check_seed(a.seed) if hasattr(a, "seed") else None,
                                                _resolve_ops(a)))
        with _sigterm_interrupts():
            code = a.fn(a)
        return code, code in SHARED_EXITS
    except KeyboardInterrupt as e:  # where the ranks stand is unknown: none waits for the others
        term = isinstance(e, Terminated)
        print(f"matnet {a.cmd}: {'stopped by SIGTERM' if term else 'interrupted'}", file=sys.stderr)
        return 128 + (signal.SIGTERM if term else signal.SIGINT), False
    except Exception as e:
        code = getattr(e, "exit_code", None)
        if code is None and not isinstance(e, (ValueError, RuntimeError, OSError)):
            raise  # a bug, not a user error: keep the traceback
        if a.verbose:
            log.exception("details")
        msg = " ".join(str(e).split())
        msg = msg if getattr(e, "resumable", False) else f"error: {msg}"  # a stop says "stopped ..." itself
        r = distributed.rank()
        if r == 0 or not getattr(e, "same_on_all_ranks", False):  # an outcome all ranks agreed on: rank 0 says it
            print(f"{f'[rank {r}] ' if r else ''}matnet {a.cmd}: {msg}", file=sys.stderr)
        code = EXIT_USAGE if code is None else code
        return code, code in SHARED_EXITS


if __name__ == "__main__":
    sys.exit(main())
