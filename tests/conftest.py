"""Shared test setup. Without a GPU the Triton kernels run under the interpreter, which must be
switched on before any @triton.jit function is defined."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from helpers import GPU_SKIP, REQUIRE_CUDA, conv_fp32_precision  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shared_data_dir() -> str | None:
    """The shared datasets: $MATNET_DATA_DIR, else ../shared/datasets beside the repo."""
    for d in (os.environ.get("MATNET_DATA_DIR"), os.path.join(REPO, "..", "shared", "datasets")):
        if d and os.path.isdir(d):
            return os.path.abspath(d)
    return None


@pytest.fixture
def mnist_dir() -> str:
    d = shared_data_dir()
    if d is None or not os.path.isdir(os.path.join(d, "mnist")):
        if os.environ.get("MATNET_REQUIRE_DATA") == "1":
            pytest.fail("MATNET_REQUIRE_DATA=1 but the MNIST files were not found")
        pytest.skip("real MNIST not found (set MATNET_DATA_DIR)")
    return os.path.join(d, "mnist")


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors on a shared machine: intra-op threads mostly spin against each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _ieee_fp32_convs():
    """fp32 convolutions in full fp32 (cuDNN's and matnet's Triton ones follow the same setting, whose default
    lets CUDA use TF32): the tests judge fp32 by fp32 error bounds. A test that wants TF32 asks for it."""
    with conv_fp32_precision("ieee"):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """MATNET_REQUIRE_CUDA=1: a skip for a missing GPU, Triton or extension feature is a failure."""
    outcome = yield
    rep = outcome.get_result()
    if REQUIRE_CUDA and rep.skipped and isinstance(rep.longrepr, tuple) and GPU_SKIP in str(rep.longrepr[2]):
        rep.outcome = "failed"
        rep.longrepr = f"MATNET_REQUIRE_CUDA=1 but this test was skipped: {rep.longrepr[2]}"
