"""Checkpoints: written atomically, with the config, and checked on load."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import MatNetConfig

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "config", "model")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or not a matnet checkpoint."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically: a temp file in the same folder, fsync, then rename,
    so a crash mid-write never leaves a truncated checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format_version": FORMAT_VERSION, **state}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises many types for truncated / foreign files
        raise CheckpointError(f"corrupt or unreadable checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
        raise CheckpointError(f"{path} is not a matnet checkpoint (missing {missing})")
    if state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {state['format_version']}; "
                              f"this matnet reads up to {FORMAT_VERSION}")
    return state


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", fast: bool = False,
               ema: bool = True) -> torch.nn.Module:
    """Rebuild a model from a checkpoint (EMA weights when present and `ema`), in eval mode."""
    from . import MatNet

    state = load_checkpoint(path)
    cfg = MatNetConfig.from_dict(state["config"])
    if fast:
        from . import FastMatNet

        model = FastMatNet(cfg)
    else:
        model = MatNet(cfg)
    weights = state["ema"] if ema and state.get("ema") is not None else state["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match its config: {e}") from e
    return model.to(device).eval()
