"""Checkpoints you can trust, and the lock that keeps one run per folder.

File format (version 2): a 9-byte magic ``MATNETCK\\x02``, the 64 hex digits of the SHA-256 of the
payload, a newline, then the payload: a ``torch.save`` of a dict of tensors and plain Python values
(configs as dicts, no pickled objects). Loading checks the digest first and unpickles with
``weights_only=True``, so a damaged file is refused by name and a crafted one runs no code.
Writes are atomic (temp file in the same folder, fsync, rename): a crash or a full disk leaves the
previous checkpoint untouched."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .config import MatNetConfig

FORMAT_VERSION = 2
MAGIC = b"MATNETCK\x02"
_DIGEST_LEN = 64
REQUIRED_KEYS = ("format_version", "config", "model")
TMP_SUFFIX = ".tmp"
LOCK_NAME = ".lock"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged, unsafe or not a matnet checkpoint."""


class DiskFullError(OSError):
    """No space left while writing a checkpoint; the previous one is still in place."""

    exit_code = 4


class FolderLockedError(RuntimeError):
    """Another live run holds the run folder."""


def _write(f: BinaryIO, data: bytes) -> None:
    f.write(data)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], what: str = "file") -> None:
    """Run `write` on a temp file beside `path`, then fsync and rename it over `path`: a crash, a full disk or a
    failed write leaves the previous file whole. The file gets the mode a plain open() would give (or the
    replaced file's). Errors name the file (DiskFullError for ENOSPC / EDQUOT)."""
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=TMP_SUFFIX)
        os.fchmod(fd, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())  # mkstemp: 0600
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            kept = f"the previous {what} is kept" if path.exists() else f"no {what} was written"
            raise DiskFullError(e.errno, f"disk full while writing {path} ({os.strerror(e.errno)}); {kept}") from e
        if isinstance(e, OSError) and e.errno is not None:
            raise OSError(e.errno, f"could not write {path}: {e.strerror or e}") from e
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write` of a text file (UTF-8)."""
    data = text.encode()
    atomic_write(path, lambda f: f.write(data))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically with a SHA-256 of its payload."""
    buf = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **state}, buf)
    payload = buf.getbuffer()
    digest = hashlib.sha256(payload).hexdigest().encode()

    def write(f: BinaryIO) -> None:
        _write(f, MAGIC + digest + b"\n")
        _write(f, payload)

    atomic_write(path, write, "checkpoint")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`, after checking its digest."""
    if not str(path).strip():
        raise CheckpointError("the checkpoint path is empty: give a checkpoint file (e.g. runs/matnet/checkpoint.pt)")
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give the checkpoint file in it (e.g. {path / 'checkpoint.pt'})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    raw = path.read_bytes()
    head = len(MAGIC) + _DIGEST_LEN + 1
    if not raw.startswith(MAGIC):
        raise CheckpointError(f"{path} is not a matnet checkpoint of format {FORMAT_VERSION} "
                              "(files from matnet before checksummed checkpoints cannot be verified; retrain)")
    payload = memoryview(raw)[head:]
    if hashlib.sha256(payload).hexdigest().encode() != raw[len(MAGIC): head - 1]:
        raise CheckpointError(f"{path} is damaged: its SHA-256 does not match the stored one (refusing to use it)")
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as e:  # an intact digest over a payload torch refuses: not ours, or unsafe
        raise CheckpointError(f"unreadable checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
        raise CheckpointError(f"{path} is not a matnet checkpoint (missing {missing})")
    if state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {state['format_version']}; "
                              f"this matnet reads up to {FORMAT_VERSION}")
    return state


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete `*.tmp` files left in `folder` by killed writers. Call only while holding its lock."""
    gone = []
    for p in Path(folder).glob("*" + TMP_SUFFIX):
        if p.is_file():
            p.unlink()
            gone.append(p)
    return gone


def make_run_folder(folder: str | os.PathLike) -> list[Path]:
    """mkdir -p `folder`; returns the folders this call created, innermost first (each one's mkdir succeeded
    here, so none was there before or made by another process)."""
    target = Path(os.path.abspath(folder))  # abspath: "new/../old" must not pass for a new folder
    made: set[Path] = set()
    for attempt in range(3):  # a concurrent remove_new_folders may take a parent away mid-walk: walk again
        try:
            for p in reversed([p for p in (target, *target.parents) if not p.exists()]):
                try:
                    p.mkdir()
                    made.add(p)
                except FileExistsError:
                    pass
            break
        except FileNotFoundError:
            if attempt == 2:
                raise
    return sorted(made, key=lambda p: len(p.parts), reverse=True)


def remove_new_folders(made: list[Path], lock_held_in: Path | None = None) -> None:
    """Undo `make_run_folder` for a run refused before it began: rmdir each folder it made, innermost first, while
    it is empty, except for the lock file in `lock_held_in` (the run's own, held by the caller). A folder that
    holds anything else, another run's lock included, stays, and so does everything above it."""
    own = None if lock_held_in is None else Path(os.path.abspath(lock_held_in))
    for d in made:
        try:
            if d == own:
                if any(e.name != LOCK_NAME for e in d.iterdir()):
                    return
                (d / LOCK_NAME).unlink(missing_ok=True)
            d.rmdir()
        except FileNotFoundError:
            continue  # gone already
        except OSError:
            return


class RunLock:
    """An exclusive lock on a run folder: `flock` on `<folder>/.lock`, which holds the owner's pid.

    The kernel drops the lock when its process dies, so a lock left by a killed run (its pid
    gone) is simply taken over."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        import fcntl

        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise FolderLockedError(f"{self.path.parent} is in use by another run (pid {owner}); "
                                        "wait for it, stop it, or choose another --out") from e
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (removing it would race)
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", fast: bool = False,
               ema: bool = True) -> torch.nn.Module:
    """Rebuild a model from a checkpoint (EMA weights when present and `ema`), in eval mode."""
    from . import MatNet

    state = load_checkpoint(path)
    with config_errors_name(path):
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
        raise CheckpointError(f"{path}: weights do not match its config: {brief(e)}") from e
    return model.to(device).eval()


@contextlib.contextmanager
def config_errors_name(path: str | os.PathLike) -> Iterator[None]:
    """A checkpoint whose config this version refuses: one error naming the file."""
    try:
        yield
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: its config is not valid in this version: {brief(e)}") from e


def brief(e: Exception, limit: int = 300) -> str:
    """An exception's message on one line, cut to `limit` characters (state_dict mismatches list every key)."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + " ..."
