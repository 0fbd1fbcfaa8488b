"""Training: Adam with gradient clipping and the original schedule (constant, then linear decay),
skip-update on non-finite or huge gradients with a stop when skips persist, EMA weights, KL
warm-up, strict JSON-lines metrics, checksummed atomic checkpoints with exact resume, a lock per
run folder, checkpoint-and-exit on SIGTERM/SIGINT, periodic IWAE evaluation and PNG outputs.

Options for speed at scale: mixed precision (autocast; fp16 with a checkpointed GradScaler),
channels_last, torch.compile, fused ops, gradient accumulation, LR warm-up and large-batch LR scaling,
fused Adam on CUDA, a wall-clock time limit and time-based checkpoints.

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
import random
import resource
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import plots
from .checkpoint import DiskFullError, RunLock, load_checkpoint, remove_stale_temps, save_checkpoint
from .config import MatNetConfig, check_field_types
from .data import HFLIP_DATASETS, BatchLoader, ImageDataset, load_dataset
from .inpaint import TASKS, InpaintTask, resolve
from .masks import SPEC_FORMS, parse_mask_spec
from .model import MatNet
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
PROGRESS_INTERVAL_NOT_TTY = 5.0  # seconds between progress-bar refreshes into a log file


class TrainingDiverged(RuntimeError):
    """Updates kept being skipped (or the weights went non-finite); the last good checkpoint is kept."""

    exit_code = EXIT_DIVERGED


class TimeLimitReached(Exception):
    """--time-limit was about to run out; a checkpoint was written and the run can be resumed."""

    exit_code = EXIT_TIME_LIMIT
    resumable = True

    def __init__(self, step: int, minutes: float):
        super().__init__(f"stopped at step {step} before the {minutes:g}-minute --time-limit; checkpoint written, "
                         "run the same command again to resume")
        self.step = step


class CompileUnavailable(RuntimeError):
    """torch.compile cannot work here (no compiler toolchain, unsupported platform or Python)."""

    def __init__(self, why: BaseException | str):
        super().__init__(f"--compile: torch.compile is unavailable here ({' '.join(str(why).split())[:300]}); "
                         "run without --compile")


class Preempted(Exception):
    """SIGTERM or SIGINT arrived; a checkpoint was written and the run can be resumed."""

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
    ops: str = _opt("auto", "fast: the fused ops (FastMatNet); reference: plain torch ops; auto: fast wherever "
                           "they are faster, which is on CUDA (Triton/CUDA kernels) and on CPU too (C++ "
                           "likelihood and KL kernels; 1.0-1.2x for the mnist preset)", choices=OPS,
                    alias=("--fast", "fast"))
    precision: str = _opt("fp32", "fp32, or autocast of the forward pass to bf16 or fp16 (fp16 adds a "
                                  "GradScaler); likelihoods and KL stay fp32", choices=tuple(PRECISIONS))
    channels_last: bool = _opt(False, "weights and batches in channels_last memory format")
    compile: bool = _opt(False, "torch.compile the forward pass and loss")
    grad_accum: int = _opt(1, "micro-batches per optimizer step, >= 1; --batch-size (the global batch) is "
                              "split into this many equal parts")
    warmup_steps: int = _opt(0, "steps of linear LR warm-up from 0 (0: off)")
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

        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps} (leave it out for the preset's)")
        for name in ("eval_images", "max_skips", "skip_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("log_every", "eval_every", "iwae_k", "iwae_images", "ckpt_every", "sample_every", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{flag(name)} must be >= 0 (0: off), got {getattr(self, name)}")
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
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be >= 0 (0: off), got {self.warmup_steps}")
        for name in ("time_limit", "ckpt_minutes"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{flag(name)} must be a finite number of minutes >= 0 (0: off), got {v}")
        for name, valid in (("ops", OPS), ("precision", PRECISIONS), ("lr_scaling", LR_SCALING),
                            ("augment", AUGMENT)):
            if getattr(self, name) not in valid:
                raise ValueError(f"{flag(name)} must be one of {', '.join(valid)}, got {getattr(self, name)!r}")


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


def lr_factor(step: int, total: int, decay_start: float, final: float) -> float:
    """Constant for the first `decay_start` fraction of training, then linear down to `final`."""
    start = int(decay_start * total)
    if step < start or total <= start:
        return 1.0
    return 1.0 - (1.0 - final) * min(1.0, (step - start) / (total - start))


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear LR warm-up: (step + 1) / warmup_steps for the first warmup_steps steps, then 1."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


def scaled_lr(lr: float, batch_size: int, base_batch: int, rule: str) -> float:
    """The large-batch LR rule: lr x (batch_size / base_batch) ** p with p = LR_SCALING[rule]."""
    return lr * (batch_size / base_batch) ** LR_SCALING[rule]


def use_fast_ops(ops: str, device: torch.device) -> bool:
    """--ops: "auto" picks the fused ops on every device they are faster on. On CUDA they replace many
    small kernels by a few fused ones; on CPU the C++ likelihood and KL kernels measured 1.0-1.2x the
    reference for the mnist preset and never slower, so auto means fast on both."""
    return ops == "fast" or (ops == "auto" and device.type in ("cuda", "cpu"))


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA memory allocated by torch on a GPU, else the process's max resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MicroBatchNoise:
    """Stands in for `model.noise` under gradient accumulation: each draw is made for the whole global batch
    and micro-batch k of n keeps its own rows. With the RNG rewound to the same state before every
    micro-batch, example i then gets the same noise as in a step without accumulation."""

    def __init__(self, model: torch.nn.Module):
        self.draw: Callable[..., torch.Tensor] = model.noise
        self.part: tuple[int, int] | None = None  # (k, n) while micro-batch k of n runs
        model.noise = self

    def __call__(self, shape: torch.Size | tuple[int, ...], device: torch.device) -> torch.Tensor:
        if self.part is None:
            return self.draw(shape, device)
        k, n = self.part
        m = shape[0]
        return self.draw((m * n, *shape[1:]), device)[k * m:(k + 1) * m]


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
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


@torch.no_grad()
def evaluate(model: MatNet, data: ImageDataset, n_images: int, iwae_k: int = 0, iwae_images: int = 0,
             batch_size: int = 100, seed: int = 1234, device: torch.device | None = None,
             progress: bool = False, chunk: int | None = None,
             extra_inputs: Callable[[int, int], tuple] | None = None) -> dict:
    """ELBO on the first `n_images` of `data`, and the IWAE bound on the first `iwae_images`
    (`iwae_k` or `iwae_images` 0: no IWAE bound). extra_inputs(i, j): further model arguments for images
    i..j-1 (a conditional model's masks), after x.

    Runs under a forked RNG with a fixed seed: results are reproducible and training's random
    stream is untouched (so resumed runs stay exact)."""
    if n_images < 1 or batch_size < 1 or iwae_k < 0 or iwae_images < 0:
        raise ValueError(f"evaluate needs n_images >= 1, batch_size >= 1, iwae_k >= 0 and iwae_images >= 0; "
                         f"got {n_images}, {batch_size}, {iwae_k}, {iwae_images}")
    device = device or next(model.parameters()).device
    more = extra_inputs or (lambda i, j: ())
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    res: dict = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        n = min(n_images, len(data))
        tot, kl_tot = 0.0, None
        for i in range(0, n, batch_size):
            j = min(n, i + batch_size)
            x = data.to_float(data.images[i:j], generator=gen).to(device)
            out = model(x, *more(i, j))
            tot += out.nll_bound.sum().item()
            kls = out.kl.sum(0)
            kl_tot = kls if kl_tot is None else kl_tot + kls
        res["elbo"] = tot / n
        res["kl_per_module"] = (kl_tot / n).tolist()
        if iwae_k and iwae_images:
            m = min(iwae_images, len(data))
            bs = max(1, min(batch_size, m))
            vals = []
            bar = progress_bar(iterable=range(0, m, bs), desc=f"IWAE k={iwae_k}", disable=not progress, leave=False)
            for i in bar:
                j = min(m, i + bs)
                x = data.to_float(data.images[i:j], generator=gen).to(device)
                vals.append(model.iwae_nll(x, *more(i, j), k=iwae_k, chunk=chunk).double().cpu())
                bar.set_postfix(nll=f"{torch.cat(vals).mean().item():.2f}", refresh=False)
            res["iwae"] = torch.cat(vals).mean().item()
            res["iwae_k"] = iwae_k
            res["iwae_images"] = m
    model.train(was_training)
    return res


class WallClock:
    """Wall-time bookkeeping for --time-limit and --ckpt-minutes (both in minutes; 0: off).

    A run stops before a step when the time left could not cover two of its slowest steps so far
    (evaluations and checkpoints included) plus a checkpoint: what it writes then is its last act."""

    def __init__(self, started: float, limit_min: float, ckpt_min: float):
        self.started, self.limit, self.every = started, limit_min * 60.0, ckpt_min * 60.0
        self.slowest, self.save_s, self.last_save = 0.0, 0.0, time.monotonic()

    def step_took(self, seconds: float) -> None:
        self.slowest = max(self.slowest, seconds)

    def saved(self, seconds: float) -> None:
        self.save_s, self.last_save = max(self.save_s, seconds), time.monotonic()

    def out_of_time(self) -> bool:
        if not self.limit:
            return False
        return time.monotonic() - self.started + 2 * self.slowest + self.save_s >= self.limit

    def checkpoint_due(self) -> bool:
        return bool(self.every) and time.monotonic() - self.last_save >= self.every


@contextlib.contextmanager
def catch_stop_signals() -> Iterator[list[int]]:
    """While active, SIGTERM and SIGINT are recorded (into the yielded list) instead of killing the
    process, so the loop can finish its step and checkpoint. A second signal acts as usual."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # handlers live in the main thread only
        yield caught
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum: int, frame: object) -> None:
        caught.append(signum)
        for s, h in old.items():
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
        self.out = Path(opts.out_dir)
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out} is a file, not a folder")
        self.out.mkdir(parents=True, exist_ok=True)
        self.lock = RunLock(self.out)
        self.lock.acquire()
        try:
            self._setup(cfg, opts)
        except BaseException:
            self.lock.release()
            raise

    def _setup(self, cfg: MatNetConfig, opts: TrainOptions) -> None:
        for p in remove_stale_temps(self.out):
            log.warning("removed %s, left by a killed run", p)
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
        task, mask = resolve(opts.task, opts.mask, resume, self.out)
        self.task = InpaintTask(mask, cfg.image_size, opts.seed) if task == "inpaint" else None  # None: density
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
        if cfg.batch_size % opts.grad_accum:
            raise ValueError(f"--grad-accum {opts.grad_accum} must divide the batch size {cfg.batch_size}")
        self.model = self._build_model(cfg, opts)
        self.ema = copy.deepcopy(self.model).eval() if cfg.ema_rate > 0 else None
        if self.ema is not None:
            self.ema.requires_grad_(False)
        self.micro_noise = MicroBatchNoise(self.model) if opts.grad_accum > 1 else None
        self.forward = self._compiled_forward() if opts.compile else self._forward
        self.amp_dtype = PRECISIONS[opts.precision]
        # fp16 needs loss scaling to keep small gradients representable; bf16 has fp32's range
        self.scaler = torch.amp.GradScaler(self.device.type) if opts.precision == "fp16" else None
        self.base_lr = scaled_lr(cfg.lr, cfg.batch_size, opts.lr_base_batch, opts.lr_scaling)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=self.base_lr, betas=cfg.adam_betas,
                                    fused=self.device.type == "cuda" or None)  # fused: one kernel for all params
        hflip = opts.augment == "hflip" or (opts.augment == "auto" and cfg.dataset in HFLIP_DATASETS)
        self.loader = BatchLoader(self.train_data, cfg.batch_size, shuffle=True, seed=opts.seed, device=self.device,
                                  hflip=hflip)
        self.step = 0
        self.skipped = 0
        self.last_skipped = False
        self.saved_step: int | None = None  # step of the checkpoint on disk, if any
        self.guard = SkipGuard(opts.max_skips, opts.skip_window, opts.max_skip_fraction)
        if resume is not None:
            self.load_state(resume)
        self._trim_metrics()
        (self.out / "config.json").write_text(self.cfg.to_json())

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

    def _forward(self, *inputs: torch.Tensor, kl_weight: float) -> Any:
        return self.model(*inputs, kl_weight=kl_weight)

    def _compiled_forward(self) -> Callable[..., Any]:
        """torch.compile of the forward pass and loss; a platform that cannot compile gives one clear error,
        at the first call at the latest (that is when torch.compile builds its code)."""
        try:
            compiled = torch.compile(self._forward)
        except Exception as e:  # e.g. an unsupported Python or platform
            raise CompileUnavailable(e) from e
        first = [True]

        def forward(*inputs: torch.Tensor, kl_weight: float) -> Any:
            if not first[0]:
                return compiled(*inputs, kl_weight=kl_weight)
            try:
                out = compiled(*inputs, kl_weight=kl_weight)
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
        rows = [r for r in read_rows(path) if r.get("step", 0) <= self.step] if self.step else []
        path.write_text("".join(json.dumps(strict_json(r), allow_nan=False) + "\n" for r in rows))

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
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            **(self.task.state_dict() if self.task is not None else {"task": "density"}),
        }

    def _kept(self) -> str:
        if self.saved_step is None:
            return "no checkpoint was written"
        return f"the last good checkpoint {self.ckpt_path} (step {self.saved_step}) is kept"

    def save(self) -> None:
        """Checkpoint, unless a weight is non-finite: good weights are never replaced by broken ones."""
        nets = [self.model] + ([self.ema] if self.ema is not None else [])
        bad = [n for net in nets for n, p in net.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise TrainingDiverged(f"training stopped at step {self.step}: non-finite weights in {bad[:3]}; "
                                   f"not saved; {self._kept()}")
        save_checkpoint(self.ckpt_path, self.state())
        self.saved_step = self.step

    def load_state(self, st: dict) -> None:
        self.model.load_state_dict(st["model"])
        if self.ema is not None:
            self.ema.load_state_dict(st["ema"] if st.get("ema") is not None else st["model"])
        self.opt.load_state_dict(st["optimizer"])  # moves the moments to the parameters' device
        self.step, self.skipped = st["step"], st.get("skipped", 0)
        self.saved_step = self.step
        self.loader.load_state_dict(st["loader"])
        set_rng_state(st["rng"])  # RNG states stay CPU byte tensors: the checkpoint is loaded on CPU
        if self.scaler is not None and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        if self.task is not None:
            self.task.load_state_dict(st)
        log.info("resumed from %s at step %d", self.ckpt_path, self.step)

    # ---- one update ----
    def train_step(self, x: torch.Tensor) -> dict:
        """One optimizer step on the global batch x, as --grad-accum micro-batches."""
        cfg, o = self.cfg, self.opts
        kl_w = min(1.0, (self.step + 1) / cfg.kl_warmup_steps) if cfg.kl_warmup_steps else 1.0
        lr = self.base_lr * warmup_factor(self.step, o.warmup_steps) * lr_factor(
            self.step, self.total, cfg.lr_decay_start, cfg.lr_final)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        outs = self.accumulate_grads(self.inputs(x), kl_w)
        loss = sum(out.loss.item() for out in outs) / len(outs)  # equal parts: the mean of means
        reg = self.inference_regularizer_grads(len(x))
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip).item()
        skip = (not math.isfinite(gnorm) or not math.isfinite(loss)
                or (cfg.skip_threshold > 0 and gnorm > cfg.skip_threshold))
        self.last_skipped = skip
        if skip:  # VDVAE-style: a non-finite or huge gradient never reaches the weights (nor the EMA)
            self.skipped += 1
        else:
            if self.scaler is not None:
                self.scaler.step(self.opt)
            else:
                self.opt.step()
            if self.ema is not None:
                with torch.no_grad():
                    for pe, p in zip(self.ema.parameters(), self.model.parameters()):
                        pe.lerp_(p, 1.0 - cfg.ema_rate)
        if self.scaler is not None:
            self.scaler.update()  # an fp16 overflow lowers the scale (and counts as a skip above)
        self.step += 1
        kl = torch.cat([out.kl.detach().float() for out in outs])
        return {
            "loss": loss,
            "nll_bound": torch.cat([out.nll_bound.detach().float() for out in outs]).mean().item(),
            "recon": torch.cat([out.recon_nll.detach().float() for out in outs]).mean().item(),
            "kl": kl.sum(1).mean().item(),
            "kl_per_module": kl.mean(0).tolist(),
            "grad_norm": gnorm,
            "lr": lr,
            "kl_weight": kl_w,
            "skipped": self.skipped,
            **({"loss_scale": self.scaler.get_scale()} if self.scaler is not None else {}),
            **({"infer_reg": reg} if reg is not None else {}),
        }

    def inference_regularizer_grads(self, n: int) -> float | None:
        """Eq. 13 from cfg.infer_reg_start on: the ELBO of n samples of the model, backpropagated into the
        inference parameters only (weighted by cfg.infer_reg_weight); its value in nats per image, else None."""
        cfg = self.cfg
        if not cfg.infer_reg_weight or self.step < cfg.infer_reg_start:
            return None
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            reg = inference_regularizer(self.model, n)
        scaled = cfg.infer_reg_weight * reg
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return reg.item()

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
            if self.micro_noise is not None:
                set_rng(start)
                self.micro_noise.part = (k, n)
            try:
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    out = self.forward(*part, kl_weight=kl_weight)
            finally:
                if self.micro_noise is not None:
                    self.micro_noise.part = None
            loss = out.loss / n
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            outs.append(out)
        return outs

    def inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The model's arguments for batch x: (x,), or (x, mask) for inpainting."""
        return (x,) if self.task is None else self.task.inputs(x)

    def log_row(self, row: dict) -> None:
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
            with catch_stop_signals() as caught:
                return self._run(until, caught)
        finally:
            self.close()

    def _run(self, until: int | None, caught: list[int]) -> dict:
        o = self.opts
        stop = min(self.total, until) if until is not None else self.total
        stream = self.loader.forever()
        bar = progress_bar(total=self.total, initial=self.step, desc="train", disable=not o.progress,
                           dynamic_ncols=True)
        t0, seen, last, ckpt_due = time.time(), 0, {}, False
        clock = WallClock(self.started, o.time_limit, o.ckpt_minutes)
        while self.step < stop:
            if clock.out_of_time():
                bar.close()
                self.timed_save(clock)
                raise TimeLimitReached(self.step, o.time_limit)
            tick = time.monotonic()
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
                raise TrainingDiverged(
                    f"training stopped at step {self.step}: {why} (non-finite loss or gradient, or grad norm "
                    f"above skip_threshold={self.cfg.skip_threshold}); recent grad norms: "
                    f"[{self.guard.recent_norms()}]; {self._kept()}")
            if caught:
                bar.close()
                self.save()
                raise Preempted(caught[0], self.step)
            if o.eval_every and (self.step % o.eval_every == 0 or self.step == self.total):
                last = self.validate(o.iwae_k)
            if o.sample_every and self.step % o.sample_every == 0:
                self.save_samples(self.out / f"samples_{self.step:07d}.png")
            ckpt_due |= bool(o.ckpt_every) and self.step % o.ckpt_every == 0
            ckpt_due |= clock.checkpoint_due()
            if ckpt_due and not self.last_skipped:  # checkpoints follow applied updates only
                self.timed_save(clock)
                ckpt_due = False
            clock.step_took(time.monotonic() - tick)
        bar.close()
        self.save()
        if self.step < self.total:
            return last
        self.save_samples(self.out / "samples.png")
        self.save_plots()
        return last

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
        tqdm.write(f"step {self.step}: val -ELBO {res['elbo']:.2f}"
                   + (f", IWAE(k={iwae_k}) {res['iwae']:.2f}" if "iwae" in res else "") + " nats")
        return row

    def save_samples(self, path: Path, n: int = 64) -> None:
        if self.task is not None:  # inpainting: a grid of imputations (Fig. 5) in place of samples
            data = self.val_data if self.val_data is not None else self.train_data
            self.task.save_grid(self.eval_model(), data, path, self.opts.seed)
            return
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.opts.seed)
            x = self.eval_model().sample(n, mean=self.eval_model().dist.binary)
        plots.save_image_grid(x, path, signed=not self.eval_model().dist.binary)

    def save_plots(self) -> None:
        nan = float("nan")  # nulls in the log are non-finite values; the plots take them as gaps
        rows = [{k: nan if v is None else v for k, v in r.items()} for r in read_rows(self.out / "metrics.jsonl")]
        train_rows = [r for r in rows if r.get("split") == "train"]
        plots.plot_nll(rows, self.out / "nll.png")
        if train_rows:
            plots.plot_kl_per_module(train_rows, self.model.kl_groups(), self.out / "kl_per_module.png")


def train(cfg: MatNetConfig, opts: TrainOptions) -> dict:
    """Train (or resume) a MatNet; returns the last validation row."""
    return Trainer(cfg, opts).run()
