"""pytest-benchmark suite of matnet: every fast op beside its plain-torch reference, and whole-model
training steps, sampling and IWAE evaluation.

    pytest benchmarks/ --benchmark-only --benchmark-json=out.json   # measure
    python benchmarks/report.py out.json --markdown                  # tabulate
    pytest benchmarks -q --benchmark-disable                         # run each once, small shapes

Environment: MATNET_BENCH_QUICK=1 shrinks every shape (always on with --benchmark-disable);
MATNET_BENCH_NO_COMPILE=1 skips the torch.compile(MatNet) benchmarks; MATNET_BENCH_MODEL_ROUNDS sets
the number of timed rounds of the model benchmarks (default 3 on CPU, 20 on CUDA);
MATNET_BENCH_THREADS=N sets torch's CPU threads (default: torch's own; 1 in quick mode);
MATNET_KEEP_FREED_MEMORY=0 measures with glibc's own malloc instead of the kept memory of the `matnet`
command (matnet.memory).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

# the benchmark modules import their shared helpers (benchutil.py) from this folder
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import benchutil  # noqa: E402


def pytest_configure(config):
    from matnet.memory import keep_freed_memory

    config._matnet_kept_memory = keep_freed_memory()  # as the `matnet` command runs


def pytest_report_header(config):
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available"
    quick = benchutil.env_flag(benchutil.QUICK_ENV) or bool(config.getoption("benchmark_disable", False))
    return (f"matnet benchmarks: torch {torch.__version__}, {torch.get_num_threads()} CPU threads "
            f"({benchutil.cpu_name()}), CUDA: {cuda}, quick mode: {quick}, "
            f"freed memory kept: {config._matnet_kept_memory}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@pytest.fixture(autouse=True)
def _threads(request):
    """MATNET_BENCH_THREADS=N: torch's CPU threads for every benchmark. Quick mode runs on one thread:
    on a busy machine, threads that wait for a core make small CPU ops many times slower."""
    want = os.environ.get(benchutil.THREADS_ENV)
    quick = benchutil.env_flag(benchutil.QUICK_ENV) or bool(request.config.getoption("benchmark_disable", False))
    n = int(want) if want else (1 if quick else 0)
    before = torch.get_num_threads()
    if n > 0 and n != before:
        torch.set_num_threads(n)
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)
