"""The extension: matnet._C loads and registers its ops; the CUDA sources compile; and without the extension
(not built, or failing to load) every op still works through the reference, with the reason logged."""

import glob
import importlib
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from matnet.ops import _dispatch, reference
from matnet.ops.gaussian import gaussian_sample_kl
from matnet.ops.likelihood import discretized_logistic_mixture_nll, discretized_logistic_nll

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(REPO, "csrc")
RAW_OPS = [
    "gaussian_sample_kl_fwd",
    "gaussian_sample_kl_bwd",
    "discretized_logistic_nll_fwd",
    "discretized_logistic_nll_bwd",
    "discretized_logistic_mixture_nll_fwd",
    "discretized_logistic_mixture_nll_bwd",
    "cuda_enabled",
]
PUBLIC_OPS = [
    "gaussian_sample_kl",
    "gaussian_sample_kl_backward",
    "discretized_logistic_nll",
    "discretized_logistic_nll_backward",
    "discretized_logistic_mixture_nll",
    "discretized_logistic_mixture_nll_backward",
]


@pytest.mark.skipif(os.environ.get("MATNET_WITH_CPP") == "0", reason="built without matnet._C")
def test_extension_loads_and_registers_ops():
    importlib.import_module("matnet._C")
    assert _dispatch.extension_loaded()
    for name in RAW_OPS + PUBLIC_OPS:
        assert hasattr(torch.ops.matnet, name), name
    schema = str(torch.ops.matnet.discretized_logistic_mixture_nll_fwd.default._schema)
    assert "Tensor log_scales" in schema and "-> (Tensor nll, Tensor lse)" in schema
    has_cuda = torch.ops.matnet.cuda_enabled()
    assert isinstance(has_cuda, bool)
    assert _dispatch.extension_has_cuda() == has_cuda
    if torch.cuda.is_available() and torch.version.cuda is not None and os.environ.get("MATNET_WITH_CUDA") == "1":
        assert has_cuda, "MATNET_WITH_CUDA=1 but the extension has no CUDA kernels"


def test_setup_py_picks_up_the_sources():
    cpp = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CSRC, "*.cpp")))
    assert {"cpu_kernels.cpp", "registration.cpp", "python_module.cpp", "cuda_glue.cpp"} <= set(cpp)
    assert glob.glob(os.path.join(CSRC, "*.cu"))


def test_failed_load_is_logged_not_raised(monkeypatch, caplog):
    real = importlib.import_module

    def failing_import(name, *args, **kwargs):
        if name == "matnet._C":
            raise ImportError("undefined symbol: simulated_for_test")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(_dispatch.importlib, "import_module", failing_import)
    with caplog.at_level(logging.WARNING, logger="matnet.ops"):
        assert _dispatch.extension_loaded.__wrapped__() is False  # the uncached body
    assert "simulated_for_test" in caplog.text


def _all_ops_fwd_bwd():
    g = torch.Generator().manual_seed(0)
    gauss = [torch.randn(3, 4, 5, generator=g).requires_grad_() for _ in range(5)]
    z, kl = gaussian_sample_kl(*gauss)
    x = torch.randint(0, 256, (2, 3, 4, 5), generator=g).float() * 2 / 255 - 1
    mean = torch.randn(2, 3, 4, 5, generator=g).requires_grad_()
    ls = (torch.rand(2, 3, 4, 5, generator=g) * 3 - 4).requires_grad_()
    nll = discretized_logistic_nll(x, mean, ls)
    K = 2
    params = [
        torch.randn(2, K, 4, 5, generator=g),
        torch.randn(2, K, 3, 4, 5, generator=g),
        torch.rand(2, K, 3, 4, 5, generator=g) * 3 - 4,
        torch.tanh(torch.randn(2, K, 3, 4, 5, generator=g)),
    ]
    params = [p.requires_grad_() for p in params]
    mix = discretized_logistic_mixture_nll(x, *params)
    (z.sum() + kl.sum() + nll.sum() + mix.sum()).backward()
    outs = [z, kl, nll, mix]
    ref = [
        *reference.gaussian_sample_kl(*gauss),
        reference.discretized_logistic_nll(x, mean, ls),
        reference.discretized_logistic_mixture_nll(x, *params),
    ]
    grads = [t.grad for t in (*gauss, mean, ls, *params)]
    return outs, ref, grads


def test_ops_work_without_extension(monkeypatch):
    monkeypatch.setattr(_dispatch, "extension_loaded", lambda: False)
    monkeypatch.setattr(_dispatch, "extension_has_cuda", lambda: False)
    outs, ref, grads = _all_ops_fwd_bwd()
    for o, r in zip(outs, ref):
        assert torch.allclose(o, r, rtol=1e-5, atol=1e-5)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_import_without_extension_in_a_fresh_process():
    """matnet._C unimportable from the start: importing and running the ops must still work."""
    script = textwrap.dedent(
        """
        import importlib.abc, logging, sys
        logging.basicConfig(level=logging.WARNING)

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "matnet._C":
                    raise ImportError("matnet._C blocked for this test")
                return None

        sys.meta_path.insert(0, Block())
        import torch
        from matnet.ops import _dispatch
        from matnet.ops.gaussian import gaussian_sample_kl
        from matnet.ops.likelihood import discretized_logistic_nll, discretized_logistic_mixture_nll
        z, kl = gaussian_sample_kl(*[torch.randn(3, 4) for _ in range(5)])
        x = torch.zeros(1, 3, 2, 2)
        nll = discretized_logistic_nll(x, torch.zeros_like(x), torch.zeros_like(x))
        mix = discretized_logistic_mixture_nll(x, torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 3, 2, 2),
                                               torch.zeros(1, 2, 3, 2, 2), torch.zeros(1, 2, 3, 2, 2))
        assert not _dispatch.extension_loaded()
        print("OK", float(nll.sum()), float(mix.sum()))
        """
    )
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("OK")
    assert "matnet._C not available" in r.stderr and "blocked for this test" in r.stderr


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    return "/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None


def test_cuda_sources_compile(tmp_path):
    """nvcc -c on each csrc/*.cu (device code and launchers: CUDA runtime only, no torch headers), with the
    flags torch's CUDAExtension and setup.py use; and the torch-facing glue (cuda_glue.cpp, which uses c10's
    device-generic API only) syntax-checked with -DMATNET_WITH_CUDA against the installed torch headers."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    cus = sorted(glob.glob(os.path.join(CSRC, "*.cu")))
    assert cus
    nvcc_flags = [
        "-std=c++17",
        "-O3",
        "-arch=sm_80",
        "-D__CUDA_NO_HALF_OPERATORS__",
        "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
        "--expt-relaxed-constexpr",
    ]
    jobs = []
    for cu in cus:
        obj = tmp_path / (os.path.basename(cu) + ".o")
        jobs.append((cu, obj, [nvcc, "-c", *nvcc_flags, "-I", CSRC, cu, "-o", str(obj)]))
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is not None:
        from torch.utils.cpp_extension import include_paths

        incs = [f"-I{p}" for p in include_paths()]
        glue = os.path.join(CSRC, "cuda_glue.cpp")
        jobs.append(
            (glue, None, [cxx, "-std=c++17", "-fsyntax-only", "-w", "-DMATNET_WITH_CUDA", *incs, "-I", CSRC, glue])
        )
    procs = [
        (src, obj, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        for src, obj, cmd in jobs
    ]  # in parallel: each takes 10-20 s
    for src, obj, p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, f"{os.path.basename(src)} failed to compile:\n{out}"
        if obj is not None:
            assert obj.stat().st_size > 0
