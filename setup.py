"""Builds the optional C++/CUDA extension ``fused_ensemble._C``.

The schemas (csrc/ops.cpp) and the CPU kernels (csrc/cpu) are always compiled. The CUDA kernels (csrc/cuda) are
compiled whenever a CUDA toolkit and a CUDA build of torch are present, GPU or not, so that a machine without a GPU
still checks that they compile. ``FUSED_ENSEMBLE_NO_EXT=1`` skips the extension entirely (the package then uses its
Triton and PyTorch paths). ``FUSED_ENSEMBLE_NO_CUDA=1`` skips only the CUDA sources.
"""

import importlib.util
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _build_helpers():
    # Loaded by path: the package itself is not importable before it is installed.
    spec = importlib.util.spec_from_file_location("build_support", os.path.join(ROOT, "fused_ensemble",
                                                                                "build_support.py"))
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
    cxx_flags = helpers.CXX_FLAGS + ["-DPy_LIMITED_API=0x030A0000"]
    use_cuda = (
        not _flag("FUSED_ENSEMBLE_NO_CUDA")
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and bool(cuda_sources)
    )
    if use_cuda:
        helpers.set_cuda_archs(torch.cuda.is_available())
        ext = cpp_extension.CUDAExtension(
            "fused_ensemble._C",
            cxx_sources + cuda_sources,
            include_dirs=helpers.nvidia_wheel_includes(),
            extra_compile_args={"cxx": cxx_flags + helpers.CUDA_CXX_FLAGS, "nvcc": helpers.NVCC_FLAGS},
            extra_link_args=helpers.LINK_FLAGS,
            py_limited_api=True,
        )
    else:
        ext = cpp_extension.CppExtension(
            "fused_ensemble._C",
            cxx_sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=helpers.LINK_FLAGS,
            py_limited_api=True,
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass,
      options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {})
