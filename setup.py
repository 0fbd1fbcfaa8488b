"""Builds matnet and its extension matnet._C.

The C++ (CPU) kernels in csrc/*.cpp are always built. The CUDA kernels in csrc/*.cu are added
when MATNET_WITH_CUDA is 1, or when it is "auto" (the default) and torch has CUDA and a CUDA
toolkit is found. Set MATNET_WITH_CPP=0 to skip the extension entirely (pure-Python install;
every op then runs its reference path).
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("MATNET_WITH_CPP", "1") == "0":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpp = sorted(glob.glob("csrc/*.cpp"))
    cu = sorted(glob.glob("csrc/*.cu"))
    if not cpp:
        return [], {}
    mode = os.environ.get("MATNET_WITH_CUDA", "auto")
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"MATNET_WITH_CUDA must be auto, 0 or 1, got {mode!r}")
    have_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    with_cuda = bool(cu) and (mode == "1" or (mode == "auto" and have_cuda))
    if mode == "1" and not have_cuda:
        raise SystemExit("MATNET_WITH_CUDA=1 but torch has no CUDA or no CUDA toolkit was found")
    # -fno-trapping-math lets the branch-free kernel math vectorize (FP exception flags are never read)
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-fno-trapping-math"]
    extra = {"cxx": cxx + (["-DMATNET_WITH_CUDA"] if with_cuda else [])}
    if with_cuda:
        extra["nvcc"] = ["-O3", "-std=c++17"]  # no --use_fast_math: the likelihoods need accurate exp/log
        ext = CUDAExtension("matnet._C", cpp + cu, extra_compile_args=extra, extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("matnet._C", cpp, extra_compile_args=extra, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=["matnet", "matnet.ops", "matnet.kernels"],
    package_dir={"matnet.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
