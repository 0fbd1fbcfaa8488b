"""Multi-process training and evaluation under torchrun (torch.distributed): process-group set-up and
teardown, rank and world information, the rows of a global batch that one rank holds, and the few
collectives the trainer needs to take every decision on all ranks together.

`torchrun --nproc_per_node=N -m matnet train ...` sets RANK, WORLD_SIZE and LOCAL_RANK; with WORLD_SIZE > 1
`session` joins the process group (NCCL on CUDA, gloo on CPU) and each rank uses cuda:LOCAL_RANK. Without
them (or with WORLD_SIZE=1) nothing here touches torch.distributed and every helper is the identity, so a
single process runs exactly the code it ran before.

`--batch-size` is the global batch: rank r of N holds its rows `shard(B)`; the data order, the
binarization and flip draws, the masks and the model noise are all drawn for the whole global batch
and each rank keeps its rows, so the result does not depend on N beyond float summation order."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

EXIT_USER_ERROR, EXIT_BUG = 2, 1  # the exit codes of matnet's CLI for an error without its own code


def world() -> int:
    """Processes in the run: torch.distributed's world size while a group is joined, else 1."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the one that writes checkpoints, metrics, PNGs and messages."""
    return rank() == 0


def launched() -> bool:
    """Started by torchrun (or another env:// launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def session(device: str = "auto") -> Iterator[None]:
    """Join the process group for the duration when launched with WORLD_SIZE > 1 (NCCL when `device` means
    CUDA, gloo otherwise); else, or when a group is already joined, do nothing. On the way out later SIGTERM /
    SIGINT are ignored: the launcher signals the remaining ranks as soon as one exits, and a rank that is
    already leaving must keep its own exit code and message (the launcher's SIGKILL still ends a stuck one)."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        yield
        return
    cuda = torch.cuda.is_available() and (device.startswith("cuda") or device == "auto")
    if cuda:
        torch.cuda.set_device(local_cuda_index())
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                signal.signal(s, signal.SIG_IGN)
        dist.destroy_process_group()


def local_cuda_index() -> int:
    """cuda:LOCAL_RANK; cuda:0 where the launcher shows each process a single GPU."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return local if torch.cuda.device_count() > 1 else 0


def rank_device(device: torch.device) -> torch.device:
    """The device this rank trains on: `device`, with CUDA mapped to cuda:LOCAL_RANK in a multi-process run."""
    if world() == 1 or device.type != "cuda":
        return device
    idx = local_cuda_index()
    if device.index is not None and device.index != idx:
        raise ValueError(f"--device {device}: under torchrun each process uses cuda:LOCAL_RANK (here cuda:{idx}); "
                         "pass --device cuda or auto")
    return torch.device("cuda", idx)


@dataclass(frozen=True)
class Rows:
    """Rows lo..hi-1 of a global batch of `total` examples: what one rank (or one micro-batch of it) holds."""

    lo: int
    hi: int
    total: int

    @property
    def slice(self) -> slice:
        return slice(self.lo, self.hi)

    def __len__(self) -> int:
        return self.hi - self.lo

    def part(self, k: int, n: int) -> Rows:
        """Micro-batch k of n equal parts of these rows."""
        m = len(self) // n
        return Rows(self.lo + k * m, self.lo + (k + 1) * m, self.total)


def shard(total: int) -> Rows:
    """This rank's rows of a batch of `total` examples: rank r of N holds rows r*total//N .. (r+1)*total//N - 1
    (equal shares when N divides total; all rows in a single process)."""
    r, n = rank(), world()
    return Rows(r * total // n, (r + 1) * total // n, total)


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(t: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """t reduced over all ranks (a new tensor on t's device); t itself in a single process."""
    if world() == 1:
        return t
    buf = t.detach().to(_collective_device(), copy=True)
    dist.all_reduce(buf, op)
    return buf.to(t.device)


def mean_floats(values: Sequence[float]) -> list[float]:
    """The mean of each value over the ranks, in float64 (a non-finite value on any rank stays non-finite)."""
    if world() == 1:
        return list(values)
    return (all_reduce(torch.tensor(values, dtype=torch.float64)) / world()).tolist()


def any_true(flag: bool) -> bool:
    """Whether `flag` holds on any rank: a decision every rank takes together."""
    return max_int(int(flag)) > 0


def max_int(v: int) -> int:
    """The largest of the ranks' values."""
    if world() == 1:
        return v
    return int(all_reduce(torch.tensor([v], dtype=torch.int64), dist.ReduceOp.MAX).item())


def average_(tensors: Sequence[torch.Tensor]) -> None:
    """Replace each tensor by its mean over the ranks, in one collective (gradients computed outside DDP)."""
    if world() == 1 or not tensors:
        return
    flat = all_reduce(torch.cat([t.detach().reshape(-1) for t in tensors])) / world()
    for t, v in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(v.view(t.shape))


def broadcast_(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite each tensor with rank src's, in one collective (results that need not be bitwise equal across
    ranks, e.g. from nondeterministic kernels, made so)."""
    if world() == 1 or not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1) for t in tensors]).to(_collective_device())
    dist.broadcast(flat, src)
    for t, v in zip(tensors, flat.to(tensors[0].device).split([t.numel() for t in tensors])):
        t.copy_(v.view(t.shape))


class RanksDisagree(RuntimeError):
    """The ranks hold different states where they must hold the same (a fault, or --out not shared by all nodes)."""

    same_on_all_ranks = True


def check_same(values: Sequence[int], what: str) -> None:
    """Raise RanksDisagree on every rank unless all ranks hold the same integers."""
    if world() == 1:
        return
    t = torch.tensor(list(values), dtype=torch.int64)
    both = all_reduce(torch.cat([t, -t]), dist.ReduceOp.MAX)
    if not torch.equal(both[:len(t)], -both[len(t):]):
        raise RanksDisagree(f"the {world()} processes disagree on {what}")


class PeerFailed(RuntimeError):
    """Another rank failed (its own message says why); this one stops too, with the same exit code."""

    same_on_all_ranks = True

    def __init__(self, what: str, failed: int, exit_code: int):
        super().__init__(f"rank {failed} failed while {what} (see its message)")
        self.exit_code = exit_code


def agree(err: BaseException | None, what: str) -> None:
    """A collective that every rank passes together: if any rank failed at `what` (err), all raise (the failed
    rank its own error, the others PeerFailed with its exit code), so no rank is left waiting in a later
    collective. When every rank failed with the same message, rank 0 alone says it. In a single process: raise
    err if there is one."""
    if world() == 1:
        if err is not None:
            raise err
        return
    code = 0 if err is None else int(getattr(err, "exit_code", EXIT_USER_ERROR if isinstance(
        err, (ValueError, RuntimeError, OSError)) else EXIT_BUG))
    said = 0 if err is None else zlib.crc32(str(err).encode("utf-8", "backslashreplace"))  # argv may hold surrogates
    both = [torch.zeros(2, dtype=torch.int64, device=_collective_device()) for _ in range(world())]
    dist.all_gather(both, torch.tensor([code, said], dtype=torch.int64, device=_collective_device()))
    failed = [(r, int(c[0].item())) for r, c in enumerate(both) if c[0].item()]
    if err is not None:
        if len(failed) == world() and all(torch.equal(c, both[0]) for c in both):
            err.same_on_all_ranks = True  # type: ignore[attr-defined]
        raise err
    if failed:
        raise PeerFailed(what, *failed[0])


def settle(shared_outcome: bool) -> None:
    """Wait for every rank before leaving the group, so that no rank tears down its connections while a peer
    still uses them (gloo then aborts that peer: "terminate called without an active exception"). Only after
    an outcome every rank shares (a rank that failed alone must exit at once, so that the launcher stops the
    others); bounded on gloo, where a timeout just lets the process leave."""
    if world() == 1 or not shared_outcome:
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timedelta(seconds=60))
        else:
            dist.barrier()
    except RuntimeError:
        pass


class NoLock:
    """Stands in for the run folder's RunLock on ranks > 0: rank 0 alone holds the folder."""

    held = False

    def acquire(self) -> None:
        pass

    def release(self) -> None:
        pass
