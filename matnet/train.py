"""Training: Adam with gradient clipping and the original schedule (constant, then linear decay),
skip-update on non-finite or huge gradients with a stop when skips persist, EMA weights, KL
warm-up, strict JSON-lines metrics, checksummed atomic checkpoints with exact resume, a lock per
run folder, checkpoint-and-exit on SIGTERM/SIGINT, periodic IWAE evaluation and PNG outputs.

Options for speed at scale: mixed precision (autocast; fp16 with a checkpointed GradScaler),
channels_last, torch.compile, fused ops, gradient accumulation, LR warm-up and large-batch LR scaling,
fused Adam (CUDA and CPU), a wall-clock time limit and time-based checkpoints.

Under torchrun (WORLD_SIZE > 1) the same Trainer runs on every rank with DDP (matnet.distributed): each
rank holds its rows of the global batch, noise and augmentation are drawn per global example, every
decision (skip, stop, checkpoint) is taken on all-reduced values, and rank 0 alone writes files.

Exit codes of `matnet train` (see the README): 0 done, 2 a user error, 3 training diverged
(`TrainingDiverged`), 4 disk full, 5 stopped before --time-limit after a checkpoint (`TimeLimitReached`),
128 + signal number after a checkpoint on SIGTERM (143) or SIGINT (130) (`Preempted`)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import random
import resource
import signal
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import distributed, plots
from .checkpoint import (
    DiskFullError,
    RunLock,
    atomic_write_text,
    brief,
    config_errors_name,
    load_checkpoint,
    make_run_folder,
    remove_new_folders,
    remove_stale_temps,
    save_checkpoint,
)
from .clustering import KMeansStopped
from .config import MatNetConfig, check_field_types, field_default
from .data import HFLIP_DATASETS, BatchLoader, ImageDataset, load_dataset
from .distributed import Rows
from .inpaint import TASKS, InpaintTask, resolve
from .masks import SPEC_FORMS, parse_mask_spec
from .model import GenerationOverflow, MatNet
from .optim import apply_schedule, build_optimizer, clip_gradients
from .regularizers import inference_regularizer

log = logging.getLogger("matnet.train")

EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_DISK_FULL = DiskFullError.exit_code
EXIT_TIME_LIMIT = 5
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
OPS = ("auto", "fast", "reference")
LR_SCALING = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}  # lr x (batch / base batch) ** power
AUGMENT = ("auto", "hflip", "none")
# torch.compile modes; those that replay CUDA graphs overwrite a call's outputs at the next call of the graph
COMPILE_MODES = {"default": False, "reduce-overhead": True, "max-autotune": True, "max-autotune-no-cudagraphs": False}
PROGRESS_INTERVAL_NOT_TTY = 5.0  # seconds between progress-bar refreshes into a log file
PRIOR_REFIT_IMAGES = 10_000  # training images whose q(z0 | x) cfg.prior_refit_step clusters
PRIOR_REFIT_SEED = 7_919  # offset of its own generators from --seed
# test hook, read by Trainer._poison_grads_for_tests only: "R:S" makes rank R's gradients NaN at step S, "R:S-"
# from step S on (comma-separated specs add up); the multi-process tests use it to check that every rank skips
POISON_ENV = "MATNET_TEST_POISON_RANK_STEP"


class TrainingDiverged(RuntimeError):
    """Updates kept being skipped (or the weights went non-finite); the last good checkpoint is kept."""

    exit_code = EXIT_DIVERGED
    same_on_all_ranks = True  # decided on agreed values: ranks > 0 leave the message to rank 0


class TimeLimitReached(Exception):
    """--time-limit was about to run out; a checkpoint was written and the run can be resumed."""

    exit_code = EXIT_TIME_LIMIT
    resumable = True
    same_on_all_ranks = True

    def __init__(self, step: int, minutes: float):
        super().__init__(f"stopped at step {step} before the {minutes:g}-minute --time-limit; checkpoint written, "
                         "run the same command again to resume")
        self.step = step


class CompileUnavailable(RuntimeError):
    """torch.compile cannot work here (no compiler toolchain, unsupported platform or Python)."""

    def __init__(self, why: BaseException | str):
        super().__init__(f"--compile: torch.compile is unavailable here ({' '.join(str(why).split())[:300]}); "
                         "run without --compile")


class TimeLimitTooShort(ValueError):
    """--time-limit ran out before the run's first step (a usage error, exit 2, said once under torchrun)."""

    same_on_all_ranks = True

    def __init__(self, minutes: float, setup_s: float):
        super().__init__(f"--time-limit {minutes:g} ran out before the first step (the set-up took {setup_s:.1f} s): "
                         "give more minutes")


class RefitStopped(Exception):
    """A stop signal arrived during the mixture prior's refit, which was abandoned (Trainer.refit_if_due)."""

    def __init__(self, signum: int):
        super().__init__(f"the mixture prior's refit was stopped by signal {signum}")
        self.signum = signum


class Preempted(Exception):
    """SIGTERM or SIGINT arrived; a checkpoint was written and the run can be resumed."""

    same_on_all_ranks = True

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint written, "
                         "run the same command again to resume")
        self.signum, self.step = signum, step
        self.exit_code = 128 + signum
        self.resumable = True


def _opt(default: Any, help: str, flag: str | None = None, **meta: Any) -> Any:
    """A TrainOptions field: its default and help are the CLI flag's (the CLI is generated from them)."""
    meta = {"help": help, **meta} if flag is None else {"help": help, "flag": flag, **meta}
    return field(default=default, metadata=meta)


def check_seed(seed: int) -> None:
    """--seed of every command: an integer that torch, NumPy and the data loader all accept."""
    if not 0 <= seed < 2**63:
        raise ValueError(f"--seed must be an integer in [0, 2**63), got {seed}")


@dataclass
class TrainOptions:
    out_dir: str = _opt("runs/matnet", "run folder: checkpoint, metrics, PNGs", flag="--out")
    data_dir: str | None = _opt(None, "dataset folder (default: $MATNET_DATA_DIR)")
    val_size: int | None = _opt(None, "training images held out for validation (default: the dataset's)")
    device: str = _opt("auto", "cpu, cuda, cuda:N or auto")
    steps: int | None = _opt(None, "training steps, >= 1 (default: the preset's, or a resumed run's own)")
    seed: int = _opt(0, "seed of the weights, data order and noise")
    log_every: int = _opt(50, "steps between metrics rows (0: off)")
    eval_every: int = _opt(1000, "steps between validations (0: off)")
    eval_images: int = _opt(1000, "validation images for the ELBO, >= 1")
    iwae_k: int = _opt(100, "importance samples of the periodic IWAE bound (0: off)")
    iwae_images: int = _opt(200, "validation images for the periodic IWAE bound (0: off)")
    ckpt_every: int = _opt(500, "steps between checkpoints (0: only at the end and when stopped)")
    sample_every: int = _opt(0, "steps between sample grids (0: only at the end)")
    max_skips: int = _opt(20, "stop (exit 3) after this many consecutive skipped updates, >= 1")
    skip_window: int = _opt(200, "window of steps for --max-skip-fraction, >= 1")
    max_skip_fraction: float = _opt(0.5, "stop (exit 3) when more than this fraction of a full window is skipped")
    resume: bool = _opt(True, "resume from the checkpoint in --out")
    start_from: str | None = _opt(None, "where --out holds no checkpoint: start a new run from this one's weights, "
                                        "EMA, Adam moments, step, data order and RNG, under this command's config "
                                        "and options (the model's parameters, the optimizer's groups, batch size "
                                        "and training split must match; lr, Adam settings, schedules, "
                                        "infer_reg_*, ... may differ; --steps: the command's, or the config's)",
                                  flag="--from")
    ops: str = _opt("auto", "fast: the fused ops (FastMatNet); reference: plain torch ops; auto: fast wherever "
                           "they are faster, which is on CUDA (Triton/CUDA kernels) and on CPU too (C++ "
                           "likelihood and KL kernels; see README for measured ratios)", choices=OPS,
                    alias=("--fast", "fast"))
    precision: str = _opt("fp32", "fp32, or autocast of the forward pass to bf16 or fp16 (fp16 adds a "
                                  "GradScaler); likelihoods and KL stay fp32", choices=tuple(PRECISIONS))
    loss_scale: float = _opt(2.0 ** 16, "with --precision fp16: the GradScaler's first loss scale, > 0; each "
                                       "overflow halves it and skips that update")
    channels_last: bool = _opt(False, "weights and batches in channels_last memory format")
    compile: bool = _opt(False, "torch.compile the forward pass and loss")
    compile_mode: str = _opt("default", "with --compile: torch.compile's mode; reduce-overhead (and max-autotune) "
                                        "replay the compiled kernels as CUDA graphs on CUDA: far fewer launches "
                                        "for small batches", choices=tuple(COMPILE_MODES))
    grad_accum: int = _opt(1, "micro-batches per optimizer step, >= 1; --batch-size (the global batch) is "
                              "split into this many equal parts")
    warmup_steps: int = _opt(0, "steps of linear LR warm-up from lr/W to lr (0: off)")
    lr_scaling: str = _opt("none", "large-batch LR rule: lr x (batch / --lr-base-batch) ** p, p = 0 (none), "
                                   "1/2 (sqrt) or 1 (linear)", choices=tuple(LR_SCALING))
    lr_base_batch: int = _opt(64, "batch size the config's lr is meant for (with --lr-scaling), >= 1")
    time_limit: float = _opt(0.0, "minutes of wall time: checkpoint and exit (code 5) before they run out "
                                  "(0: off)")
    ckpt_minutes: float = _opt(0.0, "also checkpoint every this many minutes of wall time (0: off)")
    augment: str = _opt("auto", "training-set augmentation on the device: hflip (random horizontal flips), "
                                f"none, or auto (hflip for {', '.join(HFLIP_DATASETS)})", choices=AUGMENT)
    threads: int = _opt(0, "torch CPU threads (0: torch's default)")
    progress: bool = _opt(True, "show progress bars")
    task: str | None = field(default=None, metadata={
        "help": "density: model p(x); inpaint: a conditional MatNet p(x^u | x^k) trained on --mask masks "
                "(default: a resumed run's own, else density)", "choices": TASKS})
    mask: str | None = _opt(None, f"with --task inpaint: the masks drawn per batch, one of {SPEC_FORMS}")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Reject values that would mean something else than they say (names as the CLI spells them)."""
        check_field_types(self)

        def flag(name: str) -> str:
            f = next(f for f in dataclasses.fields(self) if f.name == name)
            return f.metadata.get("flag", "--" + name.replace("_", "-"))

        if not self.out_dir.strip():
            raise ValueError("--out is empty: give the run's folder")
        if self.start_from is not None and not self.start_from.strip():
            raise ValueError("--from is empty: give the checkpoint file to start from")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps} (leave it out for the preset's)")
        for name in ("eval_images", "max_skips", "skip_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("log_every", "eval_every", "iwae_k", "iwae_images", "ckpt_every", "sample_every", "threads"):
            if getattr(self, name) < 0:
                zero = "torch's default" if name == "threads" else "off"
                raise ValueError(f"{flag(name)} must be >= 0 (0: {zero}), got {getattr(self, name)}")
        if self.val_size is not None and self.val_size < 0:
            raise ValueError(f"--val-size must be >= 0, got {self.val_size}")
        if not 0.0 < self.max_skip_fraction <= 1.0:
            raise ValueError(f"--max-skip-fraction must lie in (0, 1], got {self.max_skip_fraction}")
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.mask is not None:
            parse_mask_spec(self.mask)  # a bad spec fails here, before any data is read
        for name in ("grad_accum", "lr_base_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.lr_scaling == "none" and self.lr_base_batch != field_default("lr_base_batch", TrainOptions):
            raise ValueError(f"{flag('lr_base_batch')} has no effect without --lr-scaling sqrt or linear")
        check_seed(self.seed)
        if not (math.isfinite(self.loss_scale) and self.loss_scale > 0):
            raise ValueError(f"--loss-scale must be a finite number > 0, got {self.loss_scale}")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be >= 0 (0: off), got {self.warmup_steps}")
        for name in ("time_limit", "ckpt_minutes"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{flag(name)} must be a finite number of minutes >= 0 (0: off), got {v}")
        for name, valid in (("ops", OPS), ("precision", PRECISIONS), ("lr_scaling", LR_SCALING),
                            ("augment", AUGMENT), ("compile_mode", COMPILE_MODES)):
            if getattr(self, name) not in valid:
                raise ValueError(f"{flag(name)} must be one of {', '.join(valid)}, got {getattr(self, name)!r}")
        if self.compile_mode != "default" and not self.compile:
            raise ValueError(f"--compile-mode {self.compile_mode} needs --compile")


# options that set a run's course beyond its config: a resumed run must be given its own (older checkpoints
# did not record them and are not checked)
RUN_OPTIONS = ("seed", "lr_scaling", "lr_base_batch", "warmup_steps")


def check_run_options(opts: TrainOptions, resume: dict, path: Path) -> None:
    saved = resume.get("run_options") or {}
    diff = [f"--{k.replace('_', '-')} {getattr(opts, k)} (the run's: {v})" for k, v in saved.items()
            if k in RUN_OPTIONS and getattr(opts, k) != v]
    if diff:
        raise ValueError(f"{path} was trained with other options: {', '.join(diff)}; re-run the run's own command "
                         "to resume, or give a new --out (--no-resume starts over, overwriting this run)")


class SkipGuard:
    """Decides when skipped updates mean the run has diverged: `max_consecutive` skips in a row, or
    more than `max_fraction` of the last `window` steps. A skip threshold that every step exceeds
    (vdvae#25) thus ends the run instead of looping forever."""

    def __init__(self, max_consecutive: int, window: int, max_fraction: float):
        self.max_consecutive, self.window, self.max_fraction = max_consecutive, window, max_fraction
        self.recent: deque[tuple[float, bool]] = deque(maxlen=window)
        self.consecutive = 0

    def record(self, grad_norm: float, skipped: bool) -> str | None:
        """Record one step; return why the run must stop, or None."""
        self.recent.append((grad_norm, skipped))
        self.consecutive = self.consecutive + 1 if skipped else 0
        if self.consecutive >= self.max_consecutive:
            return f"{self.consecutive} consecutive updates were skipped"
        n_skip = sum(s for _, s in self.recent)
        if len(self.recent) == self.window and n_skip > self.max_fraction * self.window:
            return f"{n_skip} of the last {self.window} updates were skipped"
        return None

    def recent_norms(self, n: int = 10) -> str:
        return ", ".join(f"{g:.3g}" for g, _ in list(self.recent)[-n:])


def strict_json(v: Any) -> Any:
    """Non-finite floats become null: metrics.jsonl stays strict JSON (no bare NaN / Infinity)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: strict_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [strict_json(x) for x in v]
    return v


def read_rows(path: Path) -> list[dict]:
    """The metrics log's rows; lines that are not JSON objects are dropped with a warning."""
    rows = plots.read_metrics(path) if path.exists() else []
    good = [r for r in rows if isinstance(r, dict)]
    if len(good) != len(rows):
        log.warning("%s: ignored %d line(s) that are not JSON objects", path, len(rows) - len(good))
    return good


def progress_bar(**kw: Any) -> tqdm:
    """A tqdm bar that refreshes at most every few seconds when stderr is a log file, not a terminal."""
    if not sys.stderr.isatty():
        kw.setdefault("mininterval", PROGRESS_INTERVAL_NOT_TTY)
    return tqdm(**kw)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a device (cpu, cuda, cuda:N or auto)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    return dev


def scaled_lr(lr: float, batch_size: int, base_batch: int, rule: str) -> float:
    """The large-batch LR rule: lr x (batch_size / base_batch) ** p with p = LR_SCALING[rule]."""
    return lr * (batch_size / base_batch) ** LR_SCALING[rule]


def use_fast_ops(ops: str, device: torch.device) -> bool:
    """--ops: "auto" picks the fused ops on every device they are faster on. On CUDA they replace many
    small kernels by a few fused ones; on CPU a training step measured 1.00x (mnist) and 1.06x (cifar10) the
    reference with freed memory kept (benchmarks/RESULTS.md run e), never slower, so auto means fast on both."""
    return ops == "fast" or (ops == "auto" and device.type in ("cuda", "cpu"))


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA memory allocated by torch on a GPU, else the process's max resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MicroBatchNoise:
    """Stands in for `model.noise` so that noise is drawn per example of the global batch. While `rows` is set
    (the batch being run is rows lo..hi-1 of a global batch: a micro-batch of --grad-accum, a rank's shard, or
    both) each draw is made for the whole global batch and these rows are kept; a draw for R stacked copies of
    the batch (the IWAE bound's samples, sample-major) keeps these rows of each copy. With the RNG in the same
    state before every micro-batch and on every rank, example i gets the noise of a one-process step without
    accumulation."""

    def __init__(self, model: torch.nn.Module):
        self.draw: Callable[..., torch.Tensor] = model.noise
        self.rows: Rows | None = None
        model.noise = self

    def __call__(self, shape: torch.Size | tuple[int, ...], device: torch.device) -> torch.Tensor:
        r = self.rows
        if r is None:
            return self.draw(shape, device)
        reps, rest = divmod(shape[0], len(r))
        if rest:
            raise RuntimeError(f"noise for {shape[0]} rows cannot be rows {r.lo}..{r.hi - 1} of a batch")
        whole = self.draw((reps * r.total, *shape[1:]), device)
        return whole.view(reps, r.total, *shape[1:])[:, r.lo:r.hi].reshape(shape)


@contextlib.contextmanager
def batch_noise(model: torch.nn.Module) -> Iterator[MicroBatchNoise]:
    """model's MicroBatchNoise, installed for the duration where it has none; its rows are unset after."""
    own = vars(model).get("noise")
    noise = own if isinstance(own, MicroBatchNoise) else MicroBatchNoise(model)
    try:
        yield noise
    finally:
        noise.rows = None
        if noise is not own:
            if own is None:
                del model.noise
            else:
                model.noise = own


def device_rng(device: torch.device) -> tuple[Callable[[], torch.Tensor], Callable[[torch.Tensor], None]]:
    """get_state and set_state of the default generator that model noise on `device` is drawn from."""
    if device.type == "cuda":
        return (lambda: torch.cuda.get_rng_state(device)), (lambda st: torch.cuda.set_rng_state(st, device))
    return torch.get_rng_state, torch.set_rng_state


def rng_state() -> dict:
    """All RNG states as tensors and plain values, so checkpoints load with weights_only=True."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"torch": torch.get_rng_state(),
          "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                    "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
          "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():  # only the GPUs visible now (a resume may see fewer)
        for i, state in enumerate(st["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, i)


def fork_rng(device: torch.device) -> contextlib.AbstractContextManager:
    """torch's RNG (CPU, and `device`'s when it is CUDA) restored on exit: draws inside leave the run's streams."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


@torch.no_grad()
def evaluate(model: MatNet, data: ImageDataset, n_images: int, iwae_k: int = 0, iwae_images: int = 0,
             batch_size: int = 100, seed: int = 1234, device: torch.device | None = None,
             progress: bool = False, chunk: int | None = None,
             extra_inputs: Callable[[int, int], tuple] | None = None) -> dict:
    """ELBO on the first `n_images` of `data`, and the IWAE bound on the first `iwae_images`
    (`iwae_k` or `iwae_images` 0: no IWAE bound). extra_inputs(i, j): further model arguments for images
    i..j-1 (a conditional model's masks), after x.

    Runs under a forked RNG with a fixed seed: results are reproducible and training's random
    stream is untouched (so resumed runs stay exact).

    In a multi-process run each rank scores its rows of every batch (noise drawn per row of the whole batch)
    and the sums are all-reduced: every rank returns the one-process numbers, up to summation order."""
    if n_images < 1 or batch_size < 1 or iwae_k < 0 or iwae_images < 0:
        raise ValueError(f"evaluate needs n_images >= 1, batch_size >= 1, iwae_k >= 0 and iwae_images >= 0; "
                         f"got {n_images}, {batch_size}, {iwae_k}, {iwae_images}")
    device = device or next(model.parameters()).device
    more = extra_inputs or (lambda i, j: ())
    shard = distributed.world() > 1
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    res: dict = {}
    with fork_rng(device), \
            (batch_noise(model) if shard else contextlib.nullcontext()) as noise:
        torch.manual_seed(seed)
        n = min(n_images, len(data))
        tot, kl_tot = 0.0, None
        for i in range(0, n, batch_size):
            j = min(n, i + batch_size)
            r, mine = _rows_here(j - i)
            x = data.to_float(data.images[i:j], generator=gen)[r.slice].to(device)
            if noise is not None:
                noise.rows = r
            out = model(x, *more(i + r.lo, i + r.hi))
            tot += out.nll_bound.sum().item() if mine else 0.0
            kls = out.kl.sum(0) if mine else torch.zeros_like(out.kl[0])
            kl_tot = kls if kl_tot is None else kl_tot + kls
        if shard:
            tot, *kl = distributed.all_reduce(torch.tensor([tot, *kl_tot.tolist()], dtype=torch.float64)).tolist()
            kl_tot = torch.tensor(kl, dtype=torch.float64)
        res["elbo"] = tot / n
        res["kl_per_module"] = (kl_tot / n).tolist()
        if iwae_k and iwae_images:
            m = min(iwae_images, len(data))
            bs = max(1, min(batch_size, m))
            vals = []
            bar = progress_bar(iterable=range(0, m, bs), desc=f"IWAE k={iwae_k}", leave=False,
                               disable=not progress or not distributed.is_main())
            for i in bar:
                j = min(m, i + bs)
                r, mine = _rows_here(j - i)
                x = data.to_float(data.images[i:j], generator=gen)[r.slice].to(device)
                if noise is not None:
                    noise.rows = r
                # ranks holding parts of a batch draw its noise in the passes one process would use
                c = chunk or (min(iwae_k, model.iwae_chunk(j - i, device)) if shard else None)
                v = model.iwae_nll(x, *more(i + r.lo, i + r.hi), k=iwae_k, chunk=c).double().cpu()
                vals += [v] if mine else []
                if vals:
                    bar.set_postfix(nll=f"{torch.cat(vals).mean().item():.2f}", refresh=False)
            if shard:
                own = torch.tensor([sum(v.sum().item() for v in vals)], dtype=torch.float64)
                res["iwae"] = distributed.all_reduce(own).item() / m
            else:
                res["iwae"] = torch.cat(vals).mean().item()
            res["iwae_k"] = iwae_k
            res["iwae_images"] = m
    model.train(was_training)
    return res


def _rows_here(total: int) -> tuple[Rows, bool]:
    """This rank's rows of an evaluation batch, and whether it has any: a rank with none still runs row 0, so
    that every rank draws the batch's noise and the ranks' RNG streams stay in step."""
    r = distributed.shard(total)
    return (r, True) if len(r) else (Rows(0, 1, total), False)


class WallClock:
    """Wall-time bookkeeping for --time-limit and --ckpt-minutes (both in minutes; 0: off).

    A run stops before a step when the time left could not cover two of its slowest steps so far
    (evaluations and checkpoints included) plus its slowest checkpoint: what it writes then is its last act.
    The first applied step is checkpointed to time one (the optimizer's state exists from then on)."""

    def __init__(self, started: float, limit_min: float, ckpt_min: float):
        self.started, self.limit, self.every = started, limit_min * 60.0, ckpt_min * 60.0
        self.slowest, self.last_save = 0.0, time.monotonic()
        self.save_s: float | None = None  # the slowest checkpoint so far

    def step_took(self, seconds: float) -> None:
        self.slowest = max(self.slowest, seconds)

    def saved(self, seconds: float) -> None:
        self.save_s, self.last_save = max(self.save_s or 0.0, seconds), time.monotonic()

    def out_of_time(self) -> bool:
        if not self.limit:
            return False
        return time.monotonic() - self.started + 2 * self.slowest + (self.save_s or 0.0) >= self.limit

    def save_untimed(self) -> bool:
        return bool(self.limit) and self.save_s is None

    def checkpoint_due(self) -> bool:
        return bool(self.every) and time.monotonic() - self.last_save >= self.every


@contextlib.contextmanager
def catch_stop_signals(repeat: bool = False) -> Iterator[list[int]]:
    """While active, SIGTERM and SIGINT are recorded (into the yielded list) instead of killing the
    process, so the loop can finish its step and checkpoint. A second signal acts as usual, unless `repeat`:
    under torchrun a Ctrl-C reaches each worker twice (from the terminal, then forwarded by torchrun), and
    torchrun's SIGKILL after its grace period is the hard stop."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # handlers live in the main thread only
        yield caught
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum: int, frame: object) -> None:
        caught.append(signum)
        for s, h in old.items():
            if not repeat:
                signal.signal(s, h)
        log.warning("%s: finishing this step, then checkpoint and exit", signal.Signals(signum).name)

    for s in old:
        signal.signal(s, handler)
    try:
        yield caught
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class Trainer:
    """Owns the model, optimizer, EMA copy, data stream and run directory (locked while it lives)."""

    def __init__(self, cfg: MatNetConfig, opts: TrainOptions):
        self.started = time.monotonic()  # --time-limit counts from here
        self.opts = opts
        self.out = Path(os.path.normpath(opts.out_dir))  # "new/../old" is old, and must not make "new"
        self.is_main = distributed.is_main()  # rank 0 alone writes into the run folder (and holds its lock)
        self.lock = RunLock(self.out) if self.is_main else distributed.NoLock()
        err: Exception | None = None
        made: list[Path] = []  # the folders this run created: removed again if it is refused at setup
        try:
            try:
                if self.out.exists() and not self.out.is_dir():
                    raise ValueError(f"--out {self.out} is a file, not a folder")
                if any(q.exists() and not q.is_dir() for q in self.out.parents):
                    raise ValueError(f"--out {self.out}: a folder on its path is a file")
                if self.is_main:  # the other ranks only read from it
                    made = make_run_folder(self.out)
                self.lock.acquire()
                self._setup(cfg, opts)
            except Exception as e:
                err = e
            distributed.agree(err, "setting up")  # a rank that failed alone must not leave the others waiting
            self._distribute()
        except BaseException:
            if self.lock.held:
                remove_new_folders(made, lock_held_in=self.out)
            self.lock.release()
            raise

    def _check_origin(self, resume: dict, start_from: Path) -> None:
        """--from with a checkpoint in --out: the re-run of an interrupted --from command resumes it; any other run
        there is an error, not a silent switch to resuming it."""
        if "started_from" not in resume:  # written before runs recorded where they began
            if self.is_main:
                log.warning("%s holds a checkpoint: resuming it (--from only starts a run)", self.out)
            return
        origin = resume["started_from"]
        if origin is None or Path(origin) != start_from.resolve():
            began = f"started from {origin}" if origin else "did not start from a checkpoint"
            raise ValueError(f"--out {self.out} holds a run that {began}, not from --from {start_from.resolve()}: "
                             "give a new --out to start from it, or leave --from out to resume that run")

    def _setup(self, cfg: MatNetConfig, opts: TrainOptions) -> None:
        for p in remove_stale_temps(self.out) if self.is_main else ():
            log.warning("removed %s, left by a killed run", p)
        if opts.threads:
            torch.set_num_threads(opts.threads)
        self.device = distributed.rank_device(pick_device(opts.device))
        self.ckpt_path = self.out / "checkpoint.pt"
        resume = load_checkpoint(self.ckpt_path) if opts.resume and self.ckpt_path.exists() else None
        self.started_from = None if resume is not None or not opts.start_from else Path(opts.start_from)
        if resume is not None and opts.start_from:
            self._check_origin(resume, Path(opts.start_from))
        # the record of where this run began, kept across resumes: the --from of a fresh start or (checked above) of
        # the re-run of one, else None (a run of its own); a checkpoint written before runs kept it: unknown, unrecorded
        if opts.start_from:
            self.origin = {"started_from": str(Path(opts.start_from).resolve())}
        elif resume is None or "started_from" in resume:
            self.origin = {"started_from": resume.get("started_from") if resume else None}
        else:
            self.origin = {}
        if self.started_from is not None:  # another run's state under this config: load_state checks the fit
            if self.started_from.resolve() == self.ckpt_path.resolve():
                raise ValueError(f"--from {self.started_from} is --out's own checkpoint; give a new --out")
            resume = {**load_checkpoint(self.started_from), "config": cfg.to_dict()}
        elif resume is not None:  # a run resumes with its own config: asking for another is an error, not a switch
            with config_errors_name(self.ckpt_path):
                saved = MatNetConfig.from_dict(resume["config"])
            old, new = saved.to_dict(), cfg.to_dict()
            diff = [f"{k}={new[k]!r} (the run's: {old[k]!r})" for k in old if old[k] != new[k]]
            if diff:
                raise ValueError(f"{self.ckpt_path} was trained with another config: {', '.join(diff[:4])}"
                                 f"{' ...' if len(diff) > 4 else ''}; re-run the run's own command to resume, or "
                                 "give a new --out (--no-resume starts over, overwriting this run)")
            cfg = saved
            check_run_options(opts, resume, self.ckpt_path)
        self.cfg = cfg
        task, mask = resolve(opts.task, opts.mask, resume, self.out, self.started_from)
        self.task = InpaintTask(mask, cfg.image_size, opts.seed) if task == "inpaint" else None  # None: density
        # an explicit --steps may lengthen a resumed run (or end it earlier, not below the step reached);
        # otherwise its own schedule holds
        # (with --from, the command's: the source's own may be spent)
        own_total = None if self.started_from else (resume or {}).get("total_steps")
        self.total = opts.steps or own_total or cfg.steps
        torch.manual_seed(opts.seed)
        kw = dict(val_size=opts.val_size, image_size=cfg.image_size, binarize=cfg.binarize)  # fixed: one seed, always
        self.train_data = load_dataset(cfg.dataset, "train", opts.data_dir, **kw)
        self.val_data = load_dataset(cfg.dataset, "val", opts.data_dir, **kw) if opts.val_size != 0 else None
        shape = self.train_data.shape
        want = (cfg.image_channels, cfg.image_size, cfg.image_size)
        if tuple(shape) != want:
            raise ValueError(f"dataset {cfg.dataset!r} has images of shape {tuple(shape)} "
                             f"but the config expects {want}")
        refit_rows = min(PRIOR_REFIT_IMAGES, len(self.train_data))
        if cfg.prior_refit_step and cfg.prior_components > refit_rows:
            raise ValueError(f"prior_refit_step clusters {refit_rows} training images into prior_components="
                             f"{cfg.prior_components} components: give at most {refit_rows}")
        world = distributed.world()
        if cfg.batch_size % opts.grad_accum:
            raise ValueError(f"--grad-accum {opts.grad_accum} must divide the batch size {cfg.batch_size}")
        if cfg.batch_size % (world * opts.grad_accum):
            raise ValueError(f"--batch-size {cfg.batch_size} (the global batch) must be divisible by the {world} "
                             f"processes x --grad-accum {opts.grad_accum} = {world * opts.grad_accum}")
        self.sharded = world > 1
        self.rows = distributed.shard(cfg.batch_size)  # this rank's rows of every global batch
        self.model = self._build_model(cfg, opts)
        self.net: torch.nn.Module = self.model  # what the training forward runs: the model, or its DDP wrapper
        self.ema = copy.deepcopy(self.model).eval() if cfg.ema_rate > 0 else None
        if self.ema is not None:
            self.ema.requires_grad_(False)
        self.micro_noise = MicroBatchNoise(self.model) if opts.grad_accum > 1 or self.sharded else None
        self.forward = self._compiled_forward() if opts.compile else self._forward
        self.amp_dtype = PRECISIONS[opts.precision]
        # fp16 needs loss scaling to keep small gradients representable; bf16 has fp32's range
        self.scaler = (torch.amp.GradScaler(self.device.type, init_scale=opts.loss_scale)
                       if opts.precision == "fp16" else None)
        self.base_lr = scaled_lr(cfg.lr, cfg.batch_size, opts.lr_base_batch, opts.lr_scaling)
        self.opt = build_optimizer(self.model, cfg, self.base_lr, self.device)  # one or two groups (matnet.optim)
        hflip = opts.augment == "hflip" or (opts.augment == "auto" and cfg.dataset in HFLIP_DATASETS)
        self.loader = BatchLoader(self.train_data, cfg.batch_size, shuffle=True, seed=opts.seed, device=self.device,
                                  hflip=hflip, rows=self.rows.slice if self.sharded else None)
        self.step = 0
        self.skipped = 0
        self.last_skipped = False
        self.saved_step: int | None = None  # step of the checkpoint on disk, if any
        self.probe: tuple[torch.Tensor, ...] | None = None  # the last applied step's inputs: save() checks them
        self.refit_step: int | None = None  # the step whose mixture-prior refit is done (refit_if_due)
        self.caught: list[int] = []  # the stop signals caught while run() trains
        self.guard = SkipGuard(opts.max_skips, opts.skip_window, opts.max_skip_fraction)
        epoch = len(self.train_data) // cfg.batch_size  # steps per pass over the training images (full batches)
        if cfg.lr_schedule == "epochs" and cfg.steps_per_epoch != epoch and self.is_main:
            log.warning("the lr schedule counts epochs of steps_per_epoch=%d steps, but a pass over these %d training "
                        "images is %d steps, so its halvings fall at other epochs (the original codes trained on "
                        "every image: --val-size 0)", cfg.steps_per_epoch, len(self.train_data), epoch)
        for name, step in (("prior_refit_step", cfg.prior_refit_step),
                           ("infer_reg_start", cfg.infer_reg_start if cfg.infer_reg_weight else 0)):
            if step >= self.total and self.is_main:
                log.warning("%s=%d is not before the run's last step %d: it never takes effect", name, step, self.total)
        if opts.warmup_steps > self.total and self.is_main:
            log.warning("--warmup-steps %d is more than the run's %d steps: the learning rate never reaches its "
                        "full value", opts.warmup_steps, self.total)
        # warned about, not refused: the config check also runs on loading, and would lock out older checkpoints
        if cfg.infer_reg_start and not cfg.infer_reg_weight and self.is_main:
            log.warning("infer_reg_start=%d has no effect: infer_reg_weight is 0", cfg.infer_reg_start)
        if (self.val_data is None and opts.eval_every != field_default("eval_every", TrainOptions)
                and opts.eval_every and self.is_main):
            log.warning("--val-size 0 holds out no validation images: --eval-every %d evaluates nothing",
                        opts.eval_every)
        if resume is not None:
            self.load_state(resume)
            if self.started_from is not None and self.step >= self.total:
                raise ValueError(f"--from {self.started_from} is at step {self.step}, not before this run's last step "
                                 f"{self.total}: give a larger --steps")
            if self.step > self.total:
                raise ValueError(f"the run in {self.out} is already at step {self.step}, past --steps {self.total}")
            if self.started_from is not None and 0 < cfg.prior_refit_step <= self.step and self.is_main:
                log.warning("prior_refit_step=%d is not after --from's step %d: this run makes no refit",
                            cfg.prior_refit_step, self.step)
        if self.is_main:
            self._trim_metrics()
            atomic_write_text(self.out / "config.json", self.cfg.to_json())

    def _distribute(self) -> None:
        """With several processes: check that they all start from the same state (each read the checkpoint
        itself), then wrap the model in DDP, which averages the gradients over the ranks."""
        if not self.sharded:
            return
        distributed.check_same(self._fingerprint(), "the starting state (a resumed run needs --out on a file "
                                                    "system that every node shares)")
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def _fingerprint(self) -> list[int]:
        """Integers every rank must agree on: step, skips, the weights' bits and the RNG states."""
        def bits(t: torch.Tensor) -> int:
            ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
            return int(t.detach().view(ints).sum(dtype=torch.int64).item())

        rng = [torch.get_rng_state(), device_rng(self.device)[0]()]
        rng += [v for v in self.loader.state_dict().values() if isinstance(v, torch.Tensor)]
        rng += [self.task.rng.get_state()] if self.task is not None else []
        return [self.step, self.skipped, *(bits(p) for p in self.model.parameters()),
                *(zlib.crc32(t.cpu().numpy().tobytes()) for t in rng)]

    def _build_model(self, cfg: MatNetConfig, opts: TrainOptions) -> MatNet:
        fast = use_fast_ops(opts.ops, self.device)
        if self.task is not None:
            model = self.task.build(cfg, fast, self.train_data)
        elif fast:
            from . import FastMatNet

            model = FastMatNet(cfg)
        else:
            model = MatNet(cfg)
        model = model.to(self.device)
        # MatNet keeps its feature maps in the layout of its conv weights (MatNet.feature_layout)
        return model.to(memory_format=torch.channels_last) if opts.channels_last else model

    def _forward(self, *inputs: torch.Tensor, kl_weight: float | torch.Tensor) -> Any:
        return self.net(*inputs, kl_weight=kl_weight)

    def _compiled_forward(self) -> Callable[..., Any]:
        """torch.compile of the forward pass and loss; a platform that cannot compile gives one clear error,
        at the first call at the latest (that is when torch.compile builds its code)."""
        mode = self.opts.compile_mode
        try:
            compiled = torch.compile(self._forward, **({} if mode == "default" else {"mode": mode}))
        except Exception as e:  # e.g. an unsupported Python or platform
            raise CompileUnavailable(e) from e
        first = [True]

        def call(*inputs: torch.Tensor, kl_weight: float) -> Any:
            # the KL warm-up's weight as a device tensor: a Python float would recompile when it first changes
            # and then enter the graph as a host scalar
            w = torch.full((), kl_weight, device=inputs[0].device)
            if not COMPILE_MODES[mode]:
                return compiled(*inputs, kl_weight=w)
            # CUDA graphs: each call is a new step, and its outputs are copied out of the graph's memory, which
            # the next call overwrites (the micro-batches of --grad-accum are read after the last one ran)
            torch.compiler.cudagraph_mark_step_begin()
            out = compiled(*inputs, kl_weight=w)
            return dataclasses.replace(out, **{f.name: v.clone() for f in dataclasses.fields(out)
                                               if isinstance(v := getattr(out, f.name), torch.Tensor)})

        def forward(*inputs: torch.Tensor, kl_weight: float) -> Any:
            if not first[0]:
                return call(*inputs, kl_weight=kl_weight)
            try:
                out = call(*inputs, kl_weight=kl_weight)
            except Exception as e:
                import torch._dynamo.exc as dynamo_exc

                if isinstance(e, (dynamo_exc.BackendCompilerFailed, dynamo_exc.Unsupported)):
                    raise CompileUnavailable(e) from e
                raise
            first[0] = False
            return out

        return forward

    def close(self) -> None:
        """Release the run folder for another run."""
        self.lock.release()

    def _trim_metrics(self) -> None:
        """A fresh run starts a fresh log; a resumed one drops rows logged after its checkpoint."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        resumed = self.step and self.started_from is None
        rows = [r for r in read_rows(path) if r.get("step", 0) <= self.step] if resumed else []
        atomic_write_text(path, "".join(json.dumps(strict_json(r), allow_nan=False) + "\n" for r in rows))

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
            # the generator the model noise is drawn from: each rank of a resumed run loads it into its own device
            "device_rng": {"type": self.device.type, "state": device_rng(self.device)[0]()},
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "run_options": {name: getattr(self.opts, name) for name in RUN_OPTIONS},
            "val_size": len(self.val_data) if self.val_data is not None else 0,  # eval's --split val default
            **self.origin,
            **(self.task.state_dict() if self.task is not None else {"task": "density"}),
        }

    def _kept(self) -> str:
        if self.saved_step is None:
            return "no checkpoint was written"
        return f"the last good checkpoint {self.ckpt_path} (step {self.saved_step}) is kept"

    def save(self) -> None:
        """Checkpoint, unless a weight is non-finite or the weights give a non-finite loss on the last applied
        step's batch: good weights are never replaced by broken ones."""
        nets = [self.model] + ([self.ema] if self.ema is not None else [])
        bad = [n for net in nets for n, p in net.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise TrainingDiverged(f"training stopped at step {self.step}: non-finite weights in {bad[:3]}; "
                                   f"not saved; {self._kept()}")
        if distributed.any_true(not self._finite_on_probe()):
            raise TrainingDiverged(f"training stopped at step {self.step}: the weights give a non-finite loss on "
                                   f"the last applied step's batch; not saved; {self._kept()}")
        if self.sharded:  # noise is drawn for the global batch on every rank: their states must agree
            distributed.check_same(self._fingerprint(), "the weights and RNG states")
        err: Exception | None = None
        if self.is_main:
            try:
                save_checkpoint(self.ckpt_path, self.state())
            except Exception as e:
                err = e
        distributed.agree(err, "writing the checkpoint")  # no rank goes on (or exits) before rank 0's file is written
        self.saved_step = self.step

    @torch.no_grad()
    def _finite_on_probe(self) -> bool:
        """The loss of the current weights on the last applied step's inputs is finite (finite weights can still
        overflow every forward). Under a forked RNG: the run's random streams, and so exact resume, are untouched."""
        if self.probe is None:
            return True
        parts = zip(*(t.chunk(self.opts.grad_accum) for t in self.probe))  # --grad-accum's memory, not more
        with fork_rng(self.device), self._autocast():
            return all(bool(torch.isfinite(self.model(*part).loss)) for part in parts)

    def _autocast(self) -> contextlib.AbstractContextManager:
        """--precision's autocast around a forward pass (a no-op for fp32)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def load_state(self, st: dict) -> None:
        # with --from, the command's config sets every optimizer setting (eps, betas, ...): the state brings moments
        settings = [{k: v for k, v in g.items() if k != "params"} for g in self.opt.param_groups]
        try:
            self.model.load_state_dict(st["model"])
            if self.ema is not None:
                self.ema.load_state_dict(st["ema"] if st.get("ema") is not None else st["model"])
            self.opt.load_state_dict(st["optimizer"])  # moves the moments to the parameters' device
            self.loader.load_state_dict(st["loader"])
        except (RuntimeError, ValueError, KeyError) as e:
            if self.started_from is None:
                raise
            raise ValueError(f"--from {self.started_from} does not fit this run (the model's parameters, the "
                             f"optimizer's groups, the batch size and training split must match): {brief(e, 200)}"
                             ) from e
        if self.started_from is not None:
            for group, own in zip(self.opt.param_groups, settings):
                group.update(own)
        self.step, self.skipped = st["step"], st.get("skipped", 0)
        self.saved_step = None if self.started_from else self.step  # --out holds no checkpoint yet
        set_rng_state(st["rng"])  # RNG states stay CPU byte tensors: the checkpoint is loaded on CPU
        if st.get("device_rng") is not None and st["device_rng"]["type"] == self.device.type:
            device_rng(self.device)[1](st["device_rng"]["state"])
        if self.scaler is not None and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        if self.task is not None:
            self.task.load_state_dict(st)
        log.info("%s at step %d", f"started from {self.started_from}" if self.started_from else
                 f"resumed from {self.ckpt_path}", self.step)

    # ---- one update ----
    def train_step(self, x: torch.Tensor) -> dict:
        """One optimizer step on the global batch x, as --grad-accum micro-batches."""
        cfg, o = self.cfg, self.opts
        self.refit_if_due()
        kl_w = min(1.0, (self.step + 1) / cfg.kl_warmup_steps) if cfg.kl_warmup_steps else 1.0
        lr = apply_schedule(self.opt, self.step, self.total, self.base_lr, cfg, o.warmup_steps)  # lr and beta1
        self.opt.zero_grad(set_to_none=True)
        inputs = self.inputs(x)
        outs = self.accumulate_grads(inputs, kl_w)
        reg = self.inference_regularizer_grads(cfg.batch_size)
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        self._poison_grads_for_tests()
        gnorm = clip_gradients(self.opt, cfg)  # L2 term, per-group clip; the global norm before clipping
        stats = self._step_stats(outs, gnorm, reg)  # several ranks: global-batch means, the same everywhere
        loss, gnorm, reg = stats["loss"], stats["grad_norm"], stats.pop("infer_reg", None)
        skip = (not math.isfinite(gnorm) or not math.isfinite(loss) or (reg is not None and not math.isfinite(reg))
                or (cfg.skip_threshold > 0 and gnorm > cfg.skip_threshold))
        self.last_skipped = skip
        self.probe = self.probe if skip else inputs  # save() checks the weights on an applied step's batch
        if skip:  # VDVAE-style: a non-finite or huge gradient never reaches the weights (nor the EMA)
            self.skipped += 1
        else:
            if self.scaler is not None:
                self.scaler.step(self.opt)
            else:
                self.opt.step()
            if self.ema is not None:
                with torch.no_grad():  # one foreach kernel per dtype, not one launch per parameter
                    torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()),
                                         1.0 - cfg.ema_rate)
        if self.scaler is not None:
            self.scaler.update()  # an fp16 overflow lowers the scale (and counts as a skip above)
        self.step += 1
        return {
            **stats,
            "lr": lr,
            "kl_weight": kl_w,
            "skipped": self.skipped,
            **({"loss_scale": self.scaler.get_scale()} if self.scaler is not None else {}),
            **({"infer_reg": reg} if reg is not None else {}),
        }

    def _step_stats(self, outs: list, gnorm: float, reg: float | None) -> dict:
        """The step's metrics (the loss: the mean of the micro-batches' equal parts), read from the device in one
        transfer. With several ranks, each holding an equal share of the global batch, they are the means of the
        ranks' values: every rank takes the same skip decision (a non-finite loss or gradient norm on any rank is
        non-finite in the mean) and rank 0 logs what one process would."""
        def values(name: str) -> torch.Tensor:
            return torch.cat([getattr(out, name).detach().double().reshape(len(out.kl), -1) for out in outs])

        kl = values("kl")
        loss = torch.stack([out.loss.detach().double() for out in outs]).mean()
        means = torch.stack([loss, values("nll_bound").mean(), values("recon_nll").mean(), kl.sum(1).mean()])
        loss, nll, recon, total_kl, *per_module = torch.cat([means, kl.mean(0)]).tolist()
        st = {"loss": loss, "nll_bound": nll, "recon": recon, "kl": total_kl, "kl_per_module": per_module,
              "grad_norm": gnorm, **({"infer_reg": reg} if reg is not None else {})}
        if not self.sharded:
            return st
        keys = [k for k in st if k != "kl_per_module"]
        vals = distributed.mean_floats([st[k] for k in keys] + st["kl_per_module"])
        st.update(zip(keys, vals), kl_per_module=vals[len(keys):])
        return st

    def _poison_grads_for_tests(self) -> None:
        """The test hook of POISON_ENV (off unless it is set): a NaN gradient on one rank, after DDP averaged the
        gradients, to check that a bad gradient on any rank makes every rank skip the update."""
        spec = os.environ.get(POISON_ENV)
        for item in spec.split(",") if spec else ():
            r, _, s = item.partition(":")
            hit = self.step + 1 >= int(s[:-1]) if s.endswith("-") else self.step + 1 == int(s)
            if hit and int(r) == distributed.rank():
                next(p for p in self.model.parameters() if p.grad is not None).grad.fill_(float("nan"))
                return

    def inference_regularizer_grads(self, n: int) -> float | None:
        """Eq. 13 from cfg.infer_reg_start on: the ELBO of n samples of the model, backpropagated into the
        inference parameters only (weighted by cfg.infer_reg_weight); its value in nats per image, else None.

        With several ranks, every rank draws the same n samples and takes its rows (`_sample_rows`), the ELBO's
        noise is drawn per row of the n, and the gradients (of a backward outside DDP) are averaged over the
        ranks here: the same as one process computing all n, up to summation order."""
        cfg = self.cfg
        if not cfg.infer_reg_weight or self.step < cfg.infer_reg_start:
            return None
        rows = distributed.shard(n) if self.sharded else None
        with self._autocast(), self._sample_rows(rows):
            reg = inference_regularizer(self.model, n if rows is None else len(rows))
        if not reg.requires_grad:  # the model's draws overflowed (the same on every rank): NaN, and the step skips
            return reg.item()
        scaled = cfg.infer_reg_weight * reg
        scaled = self.scaler.scale(scaled) if self.scaler is not None else scaled
        if rows is None:
            scaled.backward()
            return reg.item()
        params = [p for p in self.model.parameters() if p.requires_grad]
        got = [(p, g) for p, g in zip(params, torch.autograd.grad(scaled, params, allow_unused=True))
               if g is not None]
        distributed.average_([g for _, g in got])
        for p, g in got:
            p.grad = g if p.grad is None else p.grad.add_(g)
        return reg.item()

    @torch.no_grad()
    def refit_if_due(self) -> None:
        """At cfg.prior_refit_step, once: move the mixture's components to k-means clusters of q(z0 | x)'s means
        on the first PRIOR_REFIT_IMAGES training images (MixturePrior.refit_), in the weights and their EMA copy.
        Its draws (binarization, k-means) come from generators of their own: the run's other streams are
        untouched, so resuming at this step repeats it exactly. With several ranks, rank 0's result is
        everyone's. A SIGTERM/SIGINT during the k-means (torchrun signals every rank; a rank not signalled
        finishes its k-means first) leaves every rank's prior as it was and raises RefitStopped: a checkpoint
        then predates the refit, as one at this step always does."""
        if self.step != self.cfg.prior_refit_step or self.step <= 0 or self.refit_step == self.step:
            return
        data = self.loader.dataset
        gen = torch.Generator(self.device).manual_seed(self.opts.seed + PRIOR_REFIT_SEED)
        x = data.to_float(self.loader.images[:PRIOR_REFIT_IMAGES], gen).to(next(self.model.parameters()).dtype)
        parts = [self.model.z0_posterior(x[i:i + self.cfg.batch_size])
                 for i in range(0, len(x), self.cfg.batch_size)]
        mu, logvar = torch.cat([m for m, _ in parts]), torch.cat([v for _, v in parts])
        if not (torch.isfinite(mu).all() and torch.isfinite(logvar).all()):
            raise TrainingDiverged(f"training stopped at step {self.step}: q(z0 | x) is non-finite on training "
                                   f"images, so the mixture prior cannot be refit; {self._kept()}")
        prior = self.model.z0_prior
        before = {k: v.clone() for k, v in prior.state_dict().items()}
        try:
            counts = prior.refit_(mu, logvar, self.opts.seed + PRIOR_REFIT_SEED, stop=lambda: bool(self.caught))
        except KMeansStopped:
            counts = None
        if distributed.any_true(counts is None):  # every rank reaches this, stopped early or not
            prior.load_state_dict(before)
            raise RefitStopped(distributed.max_int(self.caught[0] if self.caught else 0))
        distributed.broadcast_([prior.means, prior.logvars])
        self.refit_step = self.step
        if self.ema is not None:
            self.ema.z0_prior.load_state_dict(prior.state_dict())
        if self.is_main:
            tqdm.write(f"step {self.step}: mixture prior refit to k-means of q(z0|x) on {len(x)} training images; "
                       f"cluster sizes {sorted(counts.tolist(), reverse=True)}")

    @contextlib.contextmanager
    def _sample_rows(self, rows: Rows | None) -> Iterator[None]:
        """While active (several ranks), `model.sample(k)` draws the whole `rows.total` samples, the same on every
        rank (same RNG state), and returns this rank's rows; other noise is drawn per row of the whole draw."""
        if rows is None:
            yield
            return
        m, noise, whole = self.model, self.micro_noise, type(self.model).sample

        def sample(k: int, *a: Any, **kw: Any) -> torch.Tensor:
            noise.rows = None
            try:
                return whole(m, rows.total, *a, **kw)[rows.slice]
            finally:
                noise.rows = rows

        m.sample, noise.rows = sample, rows
        try:
            yield
        finally:
            del m.sample
            noise.rows = None

    def accumulate_grads(self, inputs: tuple[torch.Tensor, ...], kl_weight: float) -> list:
        """Forward (under autocast) and backward of each micro-batch; the gradients sum to the global batch's.

        Every micro-batch starts from the same RNG state and keeps its own rows of each global-batch noise
        draw (MicroBatchNoise), so the result does not depend on --grad-accum beyond float summation order."""
        n = self.opts.grad_accum
        layout = torch.channels_last if self.opts.channels_last else torch.contiguous_format
        inputs = tuple(t.contiguous(memory_format=layout) if t.dim() == 4 else t for t in inputs)
        parts = list(zip(*(t.chunk(n) for t in inputs)))
        get_rng, set_rng = device_rng(self.device)
        start = get_rng() if n > 1 else None
        outs = []
        for k, part in enumerate(parts):
            if start is not None:
                set_rng(start)
            if self.micro_noise is not None:
                self.micro_noise.rows = self.rows.part(k, n)  # this rank's micro-batch k of the global batch
            # DDP all-reduces the gradients in the last micro-batch's backward only
            sync = self.net is self.model or k == n - 1
            with contextlib.nullcontext() if sync else self.net.no_sync():
                try:
                    with self._autocast():
                        out = self.forward(*part, kl_weight=kl_weight)
                finally:
                    if self.micro_noise is not None:
                        self.micro_noise.rows = None
                loss = out.loss / n
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            if k == 0 and n > 1 and self.opts.compile and COMPILE_MODES[self.opts.compile_mode]:
                # the first backward handed over gradients in CUDA-graph memory, which the next micro-batch's
                # replay reuses: the others accumulate into copies of their own
                for p in self.model.parameters():
                    if p.grad is not None:
                        p.grad = p.grad.clone()
            outs.append(out)
        return outs

    def inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The model's arguments for batch x: (x,), or (x, mask) for inpainting (masks drawn per global row)."""
        return (x,) if self.task is None else self.task.inputs(x, self.rows if self.sharded else None)

    def log_row(self, row: dict) -> None:
        if not self.is_main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(strict_json(row), allow_nan=False) + "\n")

    def eval_model(self) -> MatNet:
        return self.ema if self.ema is not None else self.model

    def run(self, until: int | None = None) -> dict:
        """Train to the end of the schedule, or only up to step `until` (checkpointed, resumable).

        Raises `TrainingDiverged` when updates keep being skipped, `Preempted` after a checkpoint on
        SIGTERM/SIGINT and `TimeLimitReached` after a checkpoint before --time-limit runs out. The run
        folder is released when this returns or raises."""
        self.lock.acquire()
        try:
            with catch_stop_signals(repeat=self.sharded) as self.caught:
                return self._run(until, self.caught)
        finally:
            self.close()

    def _run(self, until: int | None, caught: list[int]) -> dict:
        o = self.opts
        stop = min(self.total, until) if until is not None else self.total
        stream = self.loader.forever()
        bar = progress_bar(total=self.total, initial=self.step, desc="train",
                           disable=not o.progress or not self.is_main, dynamic_ncols=True)
        t0, seen, last, ckpt_due = time.time(), 0, {}, False
        clock, start = WallClock(self.started, o.time_limit, o.ckpt_minutes), self.step
        while self.step < stop:
            # every stop is agreed by all ranks (a collective where wall time or signals could differ)
            if o.time_limit and distributed.any_true(clock.out_of_time()):
                bar.close()
                if self.step == start:  # exit 5 would ask to be run again, and again, with no progress
                    raise TimeLimitTooShort(o.time_limit, time.monotonic() - self.started)
                if self.saved_step != self.step:
                    self.timed_save(clock)
                raise TimeLimitReached(self.step, o.time_limit)
            tick = time.monotonic()
            try:
                self.refit_if_due()  # before the step's batch is drawn: a stop here resumes exactly
            except RefitStopped as e:
                bar.close()
                self.save()
                raise Preempted(e.signum, self.step) from None
            row = self.train_step(next(stream))
            seen += self.cfg.batch_size
            ips = seen / max(time.time() - t0, 1e-9)
            mem = peak_memory_mb(self.device)
            bar.update(1)
            bar.set_postfix(nll=f"{row['nll_bound']:.2f}", kl=f"{row['kl']:.1f}", img_s=f"{ips:.0f}",
                            mem=f"{mem:.0f}MB", refresh=False)
            if o.log_every and (self.step % o.log_every == 0 or self.step == self.total):
                self.log_row({"split": "train", "step": self.step, **row, "images_per_s": ips,
                              "peak_mem_mb": mem, "time": time.time()})
                t0, seen = time.time(), 0
            why = self.guard.record(row["grad_norm"], self.last_skipped)
            if why:
                bar.close()
                raise self._diverged(why)
            sig = distributed.max_int(caught[0] if caught else 0)
            if sig:
                bar.close()
                self.save()
                raise Preempted(sig, self.step)
            if o.eval_every and (self.step % o.eval_every == 0 or self.step == self.total):
                last = self.validate(o.iwae_k)
            if o.sample_every and self.step % o.sample_every == 0:
                self.save_samples(self.out / f"samples_{self.step:07d}.png")
            ckpt_due |= bool(o.ckpt_every) and self.step % o.ckpt_every == 0
            ckpt_due |= bool(o.ckpt_minutes) and distributed.any_true(clock.checkpoint_due())
            ckpt_due |= clock.save_untimed()  # --time-limit reserves a checkpoint's time: measure one
            if ckpt_due and not self.last_skipped:  # checkpoints follow applied updates only
                self.timed_save(clock)
                ckpt_due = False
            clock.step_took(time.monotonic() - tick)
        bar.close()
        # a run too short for the guard's rules that ends without one applied update has untrained weights
        # (counted over the whole run: a resumed one must end as a straight one; fp16's first steps find the loss
        # scale)
        if self.scaler is None and self.step >= self.total and self.skipped == self.step:
            raise self._diverged(f"none of the run's {self.step} updates was applied")
        self.save()
        if self.skipped and self.is_main:
            log.warning("%d of the run's %d updates were skipped (%s)", self.skipped, self.step, self._skip_causes())
        summary = {"step": self.step, "skipped": self.skipped,  # the last evaluation's step is its own
                   **{("val_step" if k == "step" else k): v for k, v in last.items()}}
        if self.step < self.total:
            return summary
        self.save_samples(self.out / "samples.png")
        self.save_plots()
        return summary

    def _diverged(self, why: str) -> TrainingDiverged:
        return TrainingDiverged(f"training stopped at step {self.step}: {why} ({self._skip_causes()}); recent grad "
                                f"norms: [{self.guard.recent_norms()}]; {self._kept()}")

    def _skip_causes(self) -> str:
        t = self.cfg.skip_threshold
        return "non-finite loss or gradient" + (f", or grad norm above skip_threshold={t}" if t else "")

    def timed_save(self, clock: WallClock) -> None:
        t = time.monotonic()
        self.save()
        clock.saved(time.monotonic() - t)

    def validate(self, iwae_k: int) -> dict:
        o = self.opts
        if self.val_data is None:
            return {}
        score = evaluate if self.task is None else self.task.evaluate
        res = score(self.eval_model(), self.val_data, o.eval_images, iwae_k, o.iwae_images, device=self.device)
        row = {"split": "val", "step": self.step, "val_elbo": res["elbo"],
               "elbo_images": min(o.eval_images, len(self.val_data)),
               "val_kl_per_module": res["kl_per_module"], "time": time.time()}
        if "iwae" in res:
            row.update(val_iwae=res["iwae"], iwae_k=res["iwae_k"], iwae_images=res["iwae_images"])
        self.log_row(row)
        if self.is_main:
            tqdm.write(f"step {self.step}: val -ELBO {res['elbo']:.2f}"
                       + (f", IWAE(k={iwae_k}) {res['iwae']:.2f}" if "iwae" in res else "") + " nats")
        return row

    def save_samples(self, path: Path, n: int = 64) -> None:
        """The samples grid (imputations for inpainting); a model whose draws are not finite gets a warning, not
        a failed run: the checkpoint, written before, is what matters, and the other ranks do not wait on this."""
        if not self.is_main:  # drawn under a forked RNG: the other ranks' streams need no matching draws
            return
        try:
            if self.task is not None:  # inpainting: a grid of imputations (Fig. 5) in place of samples
                data = self.val_data if self.val_data is not None else self.train_data
                self.task.save_grid(self.eval_model(), data, path, self.opts.seed)
                return
            with fork_rng(self.device):
                torch.manual_seed(self.opts.seed)
                x = self.eval_model().sample(n, mean=self.eval_model().dist.binary)
            plots.save_image_grid(x, path, signed=not self.eval_model().dist.binary)
        except (GenerationOverflow, plots.NonFiniteImages) as e:
            log.warning("%s not written at step %d: %s", path.name, self.step, e)

    def save_plots(self) -> None:
        if not self.is_main:
            return
        nan = float("nan")  # nulls in the log are non-finite values; the plots take them as gaps
        rows = [{k: nan if v is None else v for k, v in r.items()} for r in read_rows(self.out / "metrics.jsonl")]
        train_rows = [r for r in rows if r.get("split") == "train"]
        plots.plot_nll(rows, self.out / "nll.png")
        if train_rows:
            plots.plot_kl_per_module(train_rows, self.model.kl_groups(), self.out / "kl_per_module.png")


def train(cfg: MatNetConfig, opts: TrainOptions) -> dict:
    """Train (or resume) a MatNet; returns the final step, the number of skipped updates and the last validation
    row (its step as val_step). Under torchrun every process calls this and it joins the process group for the
    run (see matnet.distributed)."""
    with distributed.session(opts.device):
        return Trainer(cfg, opts).run()
