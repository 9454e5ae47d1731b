"""Builds the optional C++/CUDA extension ``fused_ensemble._C``.

The schemas (csrc/ops.cpp) and the CPU kernels (csrc/cpu) are always compiled. The CUDA kernels (csrc/cuda) are
compiled whenever a CUDA toolkit and a CUDA build of torch are present, GPU or not, so that a machine without a GPU
still checks that they compile. ``FUSED_ENSEMBLE_NO_EXT=1`` skips the extension entirely (the package then uses its
Triton and PyTorch paths). ``FUSED_ENSEMBLE_NO_CUDA=1`` skips only the CUDA sources.
"""

import glob
import importlib.util
import os
import site
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _nvidia_wheel_includes():
    # CUDA builds of torch from PyPI ship cuSPARSE/cuBLAS headers in nvidia/*/include wheels rather than in
    # the toolkit folder; torch's headers include them, so nvcc needs these folders.
    roots = site.getsitepackages() + [site.getusersitepackages()] + sys.path
    found = []
    for root in roots:
        for inc in sorted(glob.glob(os.path.join(root, "nvidia", "*", "include"))):
            if os.path.isdir(inc) and inc not in found:
                found.append(inc)
    return found


def _build_helpers():
    # Loaded by path: the package itself is not importable before it is installed.
    spec = importlib.util.spec_from_file_location("_cuda_toolkit", os.path.join(ROOT, "fused_ensemble",
                                                                                "_cuda_toolkit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions():
    if _flag("FUSED_ENSEMBLE_NO_EXT"):
        return [], {}
    helpers = _build_helpers()
    helpers.set_cuda_home()
    import torch
    from torch.utils import cpp_extension

    cxx_sources, cuda_sources = helpers.extension_sources("csrc")
    if not cxx_sources:
        return [], {}
    # -fno-math-errno: sqrt and friends may then be vectorized (the optimizer kernels' plain loops); errno is
    # never read here, and no result changes.
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-DPy_LIMITED_API=0x030A0000"]
    use_cuda = (
        not _flag("FUSED_ENSEMBLE_NO_CUDA")
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and bool(cuda_sources)
    )
    if use_cuda:
        if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            # No GPU to ask: build for Ampere and Hopper (A100, H100/H200) instead of torch's long default list.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        ext = cpp_extension.CUDAExtension(
            "fused_ensemble._C",
            cxx_sources + cuda_sources,
            include_dirs=_nvidia_wheel_includes(),
            extra_compile_args={"cxx": cxx_flags + ["-DFUSED_ENSEMBLE_WITH_CUDA"],
                                "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    else:
        ext = cpp_extension.CppExtension(
            "fused_ensemble._C",
            cxx_sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass,
      options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {})
