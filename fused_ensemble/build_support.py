"""What building the extension needs, for setup.py and _extension.build_jit alike: its source files and the CUDA
toolkit.

torch guesses CUDA_HOME from the folder above ``nvcc`` on PATH; where nvcc is a copy or wrapper in /usr/local/bin
(as on our machines) that guess is /usr/local, which has no libcudart, and linking fails. This module imports
nothing from the package, so setup.py can load it before the package is installed.
"""

from __future__ import annotations

import glob
import os
import shutil

_RUNTIME = ("lib64/libcudart.so", "lib/libcudart.so", "targets/x86_64-linux/lib/libcudart.so")


def extension_sources(csrc: str) -> tuple[list[str], list[str]]:
    """The C++ sources under the folder ``csrc`` (the schemas, csrc/*.cpp, and the CPU kernels, csrc/cpu/*.cpp) and
    the CUDA sources (csrc/cuda/*.cu), each list sorted; the paths start with ``csrc`` as given."""
    cxx = sorted(glob.glob(os.path.join(csrc, "*.cpp"))) + sorted(glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    return cxx, sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))


def _has_runtime(root: str) -> bool:
    return any(os.path.exists(os.path.join(root, lib)) for lib in _RUNTIME)


def set_cuda_home() -> str | None:
    """Sets CUDA_HOME to a toolkit folder holding nvcc and libcudart, unless CUDA_HOME/CUDA_PATH is already set.
    Must run before torch.utils.cpp_extension is imported (it reads CUDA_HOME once). Returns the folder or None."""
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
