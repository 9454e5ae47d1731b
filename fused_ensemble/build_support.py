"""How the C++/CUDA extension is built, written once for setup.py and ``fused_ensemble.extension.build_jit``: its
sources, compiler flags, include folders and the CUDA toolkit to use.

setup.py loads this file by path (the package is not importable before it is installed), so it imports nothing
from the package. It is the one module besides ``fused_ensemble.config`` that reads the environment: the build's
own variables (``CUDA_HOME``/``CUDA_PATH``, ``TORCH_CUDA_ARCH_LIST``), which it sets for torch's build tools.
"""

from __future__ import annotations

import glob
import os
import shutil
import site
import sys

_RUNTIME = ("lib64/libcudart.so", "lib/libcudart.so", "targets/x86_64-linux/lib/libcudart.so")

# -fno-math-errno: sqrt and friends may then be vectorized (the optimizer kernels' plain loops); errno is never read
# here, and no result changes.
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno"]
CUDA_CXX_FLAGS = ["-DFUSED_ENSEMBLE_WITH_CUDA"]
NVCC_FLAGS = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]
LINK_FLAGS = ["-fopenmp"]
DEFAULT_CUDA_ARCHS = "8.0;9.0"
"""Built for when no GPU can be asked: Ampere and Hopper (A100, H100/H200) instead of torch's long default list."""


def extension_sources(csrc: str) -> tuple[list[str], list[str]]:
    """The C++ sources under the folder ``csrc`` (the schemas, csrc/*.cpp, and the CPU kernels, csrc/cpu/*.cpp) and
    the CUDA sources (csrc/cuda/*.cu), each list sorted; the paths start with ``csrc`` as given."""
    cxx = sorted(glob.glob(os.path.join(csrc, "*.cpp"))) + sorted(glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    return cxx, sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))


def nvidia_wheel_includes() -> list[str]:
    """Include folders of the ``nvidia`` wheels: CUDA builds of torch from PyPI ship cuSPARSE/cuBLAS headers there
    rather than in the toolkit folder, and torch's headers include them, so nvcc needs these folders."""
    roots = site.getsitepackages() + [site.getusersitepackages()] + sys.path
    found: list[str] = []
    for root in roots:
        for include in sorted(glob.glob(os.path.join(root, "nvidia", "*", "include"))):
            if os.path.isdir(include) and include not in found:
                found.append(include)
    return found


def _has_runtime(root: str) -> bool:
    return any(os.path.exists(os.path.join(root, lib)) for lib in _RUNTIME)


def set_cuda_home() -> str | None:
    """Sets CUDA_HOME to a toolkit folder holding nvcc and libcudart, unless CUDA_HOME/CUDA_PATH is already set.
    Must run before torch.utils.cpp_extension is imported (it reads CUDA_HOME once). Returns the folder or None.

    torch guesses CUDA_HOME from the folder above ``nvcc`` on PATH; where nvcc is a copy or wrapper in
    /usr/local/bin that guess is /usr/local, which has no libcudart, and linking fails."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            return os.environ[variable]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if os.path.exists(os.path.join(root, "bin", "nvcc")) and _has_runtime(root):
            os.environ["CUDA_HOME"] = root
            return root
    return None


def set_cuda_archs(gpu_available: bool) -> None:
    """Without a GPU to ask and no TORCH_CUDA_ARCH_LIST given, build for ``DEFAULT_CUDA_ARCHS`` (torch's build
    tools fail to pick architectures without a GPU)."""
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not gpu_available:
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
