"""The package's switches: the environment variables it reads, read once here, and the runtime modes.

Every other module takes its configuration from ``settings`` (or has it passed down), so that what the package
does never depends on when an environment variable happened to be read. ``settings`` is built when the package
is imported; code that needs other values (tests) replaces it with ``dataclasses.replace(settings, ...)``.

Environment variables:

- ``FUSED_ENSEMBLE_KEEP_CPU_MEMORY=1``: raise glibc malloc's thresholds on the first CPU forward of a fused ensemble
  (faster CPU steps, a larger peak: see ``fused_ensemble.cpu_memory``); ``=0`` refuses the setting even when code
  asks for it with ``cpu_memory.retain_freed_cpu_memory()``. Unset: glibc's defaults unless code asks.
- ``FUSED_ENSEMBLE_CUDA_SHORT_ROWS=1``: let the CUDA C++ reduction kernels use their short-row kernel (rows of at
  most 16 classes, each member's rows dense). Opt-in: it has not yet been measured against the row kernel on a GPU.
- ``TRITON_INTERPRET=1`` (triton's own variable, read by triton when it is first imported): the Triton kernels
  run on CPU tensors through triton's interpreter.
- ``GIT_COMMIT``: the commit that benchmark results record when ``git`` cannot tell.
- ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``, ``GLIBC_TUNABLES`` (with a
  ``glibc.malloc`` tunable) and ``LD_PRELOAD`` (of jemalloc, tcmalloc or mimalloc) say that the user configured the
  allocator, which the package then leaves alone.

Runtime mode: ``conv_backward(mode)`` chooses how the fused convolutions of the forwards run inside it compute
their backward (see ``fused_ensemble.fusion.rules.conv_backward``); ``conv_backward_mode()`` is the current one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

CONV_BACKWARD_MODES = ("grouped", "per_member")
_ALLOCATOR_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_ALTERNATIVE_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


@dataclass(frozen=True)
class Settings:
    """What the environment asked for (see the module docstring for each variable). ``keep_cpu_memory``: True
    (``=1``), False (``=0``) or None (unset, or any other value)."""

    keep_cpu_memory: bool | None = None
    cuda_short_rows: bool = False
    triton_interpret: bool = False
    allocator_configured_by_user: bool = False
    git_commit: str | None = None

    @classmethod
    def from_environment(cls, environment: Mapping[str, str] | None = None) -> Settings:
        environment = os.environ if environment is None else environment
        preload = environment.get("LD_PRELOAD", "")
        return cls(
            keep_cpu_memory={"1": True, "0": False}.get(environment.get("FUSED_ENSEMBLE_KEEP_CPU_MEMORY", "")),
            cuda_short_rows=environment.get("FUSED_ENSEMBLE_CUDA_SHORT_ROWS", "0") == "1",
            triton_interpret=environment.get("TRITON_INTERPRET", "0") == "1",
            allocator_configured_by_user=(
                any(name in environment for name in _ALLOCATOR_VARIABLES)
                or "glibc.malloc" in environment.get("GLIBC_TUNABLES", "")
                or any(allocator in preload for allocator in _ALTERNATIVE_ALLOCATORS)),
            git_commit=environment.get("GIT_COMMIT") or None,
        )


settings = Settings.from_environment()
"""The package's settings, read from the environment at import."""

_conv_backward_mode = "grouped"


def conv_backward_mode() -> str:
    """The convolution backward mode of forwards run now: ``"grouped"`` unless inside
    ``conv_backward("per_member")``."""
    return _conv_backward_mode


@contextlib.contextmanager
def conv_backward(mode: str) -> Iterator[None]:
    """Within this context (process-wide, as the forwards of ``nn.DataParallel`` replicas run in other threads), the
    fused convolutions of a forward compute their backward
    ``mode``-wise: ``"grouped"`` (one grouped convolution backward, the default) or ``"per_member"`` (N dense
    backwards on the members' channel slices; experimental). The choice is made in the forward::

        with conv_backward("per_member"):
            loss = member_cross_entropy(fused(x), y)
        loss.backward()
    """
    if mode not in CONV_BACKWARD_MODES:
        raise ValueError(f"unknown conv backward mode {mode!r}; expected one of {CONV_BACKWARD_MODES}")
    global _conv_backward_mode
    previous, _conv_backward_mode = _conv_backward_mode, mode
    try:
        yield
    finally:
        _conv_backward_mode = previous
