"""The `matnet` command line: train, eval, sample.

Every flag is generated from a dataclass field (TrainOptions, EvalOptions, SampleOptions and the
MatNetConfig fields in CONFIG_FLAGS), so defaults and help live in one place. Every user error
ends in one line on stderr and a non-zero exit code (see `main`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch

from .config import PRESETS, MatNetConfig, check_field_types
from .train import EXIT_USAGE, TrainOptions, strict_json

log = logging.getLogger("matnet.cli")

# config fields with a flag of their own (any field can be set with --set KEY=JSON)
CONFIG_FLAGS = ("dataset", "batch_size", "lr", "channels", "kl_warmup_steps", "ema_rate", "ar_layers")
# TrainOptions fields that eval and sample take too
COMMON = ("device", "data_dir", "seed", "threads", "fast")


def _f(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


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
    val_size: int | None = _f(None, "as given to train (for --split val)")
    ema: bool = _f(True, "use the EMA weights where the checkpoint has them")
    out: str | None = _f(None, "also write the result as JSON here")

    def __post_init__(self) -> None:
        check_field_types(self)
        _at_least(self, {"n_images": 1, "batch_size": 1, "chunk": 1, "k": 0, "iwae_images": 0, "val_size": 0})


@dataclass
class SampleOptions:
    checkpoint: str = _f("", "checkpoint.pt to sample from", positional=True)
    n: int = _f(64, "number of samples, >= 1")
    temperature: float = _f(1.0, "prior temperature, > 0")
    mean: bool = _f(False, "show E[x|z] instead of a draw")
    out: str = _f("samples.png", "PNG grid to write")

    def __post_init__(self) -> None:
        check_field_types(self)
        _at_least(self, {"n": 1})
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"--temperature must be a finite number > 0, got {self.temperature}")


def _at_least(opts: Any, lows: dict[str, int]) -> None:
    for name, low in lows.items():
        v = getattr(opts, name)
        if v is not None and v < low:
            off = " (0: off)" if low == 0 and name in ("k", "iwae_images") else ""
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


def cmd_train(a: argparse.Namespace) -> int:
    from .train import train

    cfg = _config_from_args(a)
    opts = from_args(TrainOptions, a)
    res = train(cfg, opts)
    print(json.dumps(strict_json({k: v for k, v in res.items() if not isinstance(v, list)})))
    print(f"outputs in {opts.out_dir}: checkpoint.pt metrics.jsonl nll.png samples.png kl_per_module.png")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint, load_model
    from .data import load_dataset
    from .train import evaluate, pick_device

    o: EvalOptions = from_args(EvalOptions, a)
    _threads(a.threads)
    dev = pick_device(a.device)
    model = load_model(o.checkpoint, dev, fast=a.fast, ema=o.ema)
    cfg = model.cfg
    data = load_dataset(o.dataset or cfg.dataset, o.split, a.data_dir, val_size=o.val_size,
                        image_size=cfg.image_size)
    n = min(o.n_images or len(data), len(data))
    m = n if o.iwae_images is None else min(o.iwae_images, n)
    t = time.time()
    res = evaluate(model, data, n, o.k, m, batch_size=o.batch_size, seed=a.seed, device=dev, progress=True,
                   chunk=o.chunk)
    res["seconds"] = time.time() - t
    res["step"] = load_checkpoint(o.checkpoint).get("step")
    res.update(split=o.split, elbo_images=n, dataset=o.dataset or cfg.dataset)
    if cfg.likelihood != "bernoulli":
        bpd = 1.0 / (cfg.data_dims * math.log(2))
        res["elbo_bits_per_dim"] = res["elbo"] * bpd
        if "iwae" in res:
            res["iwae_bits_per_dim"] = res["iwae"] * bpd
    res.pop("kl_per_module", None)
    res = strict_json(res)
    print(json.dumps(res))
    if o.out:
        Path(o.out).write_text(json.dumps(res, indent=2))
    return 0


def cmd_sample(a: argparse.Namespace) -> int:
    from .checkpoint import load_model
    from .plots import save_image_grid
    from .train import pick_device

    o: SampleOptions = from_args(SampleOptions, a)
    _threads(a.threads)
    torch.manual_seed(a.seed)
    model = load_model(o.checkpoint, pick_device(a.device), fast=a.fast)
    x = model.sample(o.n, temperature=o.temperature, mean=o.mean)
    save_image_grid(x, o.out, signed=not model.dist.binary)
    print(f"wrote {o.n} samples to {o.out}")
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (and exit 2), like every other user error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="matnet", description="Matryoshka Networks: train, evaluate, sample.",
                epilog="exit codes: 0 done; 2 a user error; 3 training diverged (last good checkpoint kept); "
                       "4 disk full; 130 / 143 stopped by SIGINT / SIGTERM after writing a checkpoint")
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

    e = sub.add_parser("eval", help="ELBO and IWAE bound of a checkpoint")
    add_fields(e, EvalOptions)
    add_fields(e, TrainOptions, only=COMMON)
    e.set_defaults(fn=cmd_eval)

    s = sub.add_parser("sample", help="write a PNG grid of samples")
    add_fields(s, SampleOptions)
    add_fields(s, TrainOptions, only=COMMON)
    s.set_defaults(fn=cmd_sample)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit codes: 0 done; 2 a user error (one line on stderr); 3 training diverged;
    4 disk full; 128 + signal (130 SIGINT, 143 SIGTERM) when stopped after a checkpoint."""
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return a.fn(a)
    except KeyboardInterrupt:
        print(f"matnet {a.cmd}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        code = getattr(e, "exit_code", None)
        if code is None and not isinstance(e, (ValueError, RuntimeError, OSError)):
            raise  # a bug, not a user error: keep the traceback
        if a.verbose:
            log.exception("details")
        kind = "stopped" if code is not None and code >= 128 else "error"
        msg = " ".join(str(e).split())
        print(f"matnet {a.cmd}: {kind}: {msg}", file=sys.stderr)
        return EXIT_USAGE if code is None else code


if __name__ == "__main__":
    sys.exit(main())
