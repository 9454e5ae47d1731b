"""Best-effort loading of the compiled extension ``fused_ensemble._C`` (the ``fused_ensemble_ext`` ops).

Importing ``fused_ensemble._C`` registers ``torch.ops.fused_ensemble_ext.{reduce_forward, reduce_backward,
stats_forward}`` (C++ CPU kernels, plus CUDA kernels when the build had a CUDA toolkit). The package works without
it, as torchao does: a missing extension is a fact to report, a present one that fails to load is a warning, and
neither is an import error. ``build_jit`` compiles the same sources on the spot (ninja), for a machine where the
package was installed without building them.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings

import torch

_OPS_NAMESPACE = "fused_ensemble_ext"
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CSRC = os.path.join(_REPO_ROOT, "csrc")

# None: not tried yet; True: loaded; False: unavailable, with the reason in _failure_reason.
_loaded: bool | None = None
_failure_reason = "not tried yet"


def _has_kernel(dispatch_key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"{_OPS_NAMESPACE}::reduce_forward", dispatch_key)
    except RuntimeError:  # the schema itself is not registered: the library is not loaded
        return False


def _ops_registered() -> bool:
    return _has_kernel("CPU")


def load_extension() -> bool:
    """Imports ``fused_ensemble._C`` once; returns whether the ``fused_ensemble_ext`` ops are available.

    A missing build is silent (see ``extension_status``); a built library that fails to load (a torch version
    mismatch, a missing symbol) warns once, since that is a broken install rather than a choice.
    """
    global _loaded, _failure_reason
    if _loaded is not None:
        return _loaded
    if _ops_registered():  # already loaded, e.g. by build_jit
        _loaded, _failure_reason = True, ""
        return True
    if importlib.util.find_spec("fused_ensemble._C") is None:
        _loaded, _failure_reason = False, "not built (no fused_ensemble/_C*.so; pip install the package, or " \
                                          "call fused_ensemble.extension.build_jit())"
        return False
    try:
        importlib.import_module("fused_ensemble._C")
    except (ImportError, OSError) as exc:
        _loaded, _failure_reason = False, f"failed to load: {type(exc).__name__}: {exc}"
        warnings.warn(f"fused_ensemble: the compiled extension fused_ensemble._C exists but {_failure_reason}; "
                      f"the C++ kernels are disabled (rebuild it against torch {torch.__version__})",
                      RuntimeWarning, stacklevel=2)
        return False
    _loaded, _failure_reason = True, ""
    return True


def extension_status() -> str:
    """Why the extension is unavailable ("not built ...", "failed to load: ..."), or "loaded"."""
    load_extension()
    return "loaded" if _loaded else _failure_reason


def has_cuda_kernels() -> bool:
    """Whether CUDA implementations of the ``fused_ensemble_ext`` ops are registered (the build had CUDA)."""
    return load_extension() and _has_kernel("CUDA")


def build_jit(verbose: bool = False) -> bool:
    """Compiles csrc/ with ``torch.utils.cpp_extension.load`` (ninja) and loads the result; returns success.

    For a checkout without a prebuilt extension (e.g. a GPU machine where the package was installed with
    ``FUSED_ENSEMBLE_NO_EXT=1``). The CUDA sources are included when torch is a CUDA build and a CUDA toolkit is
    found (CUDA_HOME). The build is cached by torch under ``TORCH_EXTENSIONS_DIR``. Returns False (with the reason
    in ``extension_status()``) if the sources are absent or the build fails; if the ops are already registered,
    nothing is built.
    """
    global _loaded, _failure_reason
    if _ops_registered():
        _loaded, _failure_reason = True, ""
        return True
    from fused_ensemble import build_support

    build_support.set_cuda_home()  # before cpp_extension reads CUDA_HOME
    from torch.utils import cpp_extension

    sources, cuda_sources = build_support.extension_sources(_CSRC)
    if not sources:
        _loaded, _failure_reason = False, f"not built, and no C++ sources to build under {_CSRC}"
        return False
    with_cuda = bool(cuda_sources) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    cxx_flags = list(build_support.CXX_FLAGS)
    if with_cuda:
        sources += cuda_sources
        cxx_flags += build_support.CUDA_CXX_FLAGS
        build_support.set_cuda_archs(torch.cuda.is_available())
    try:
        cpp_extension.load(
            name="fused_ensemble_C_jit",
            sources=sources,
            extra_cflags=cxx_flags,
            extra_cuda_cflags=build_support.NVCC_FLAGS,
            extra_ldflags=build_support.LINK_FLAGS,
            extra_include_paths=build_support.nvidia_wheel_includes() if with_cuda else [],
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as exc:  # a compiler error must come back as a reason, not break the caller
        _loaded, _failure_reason = False, f"JIT build failed: {type(exc).__name__}: {exc}"
        return False
    _loaded, _failure_reason = True, ""
    return True
