"""An opt-in glibc malloc setting for running stacked ensembles on the CPU: faster CPU steps, a larger peak memory
(see ``retain_freed_cpu_memory``; the numbers: docs/performance.md, "The CPU allocator")."""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Iterable

import torch

from fused_ensemble import config

# glibc's mallopt parameters (malloc.h) and the values set for stacked ensembles; see retain_freed_cpu_memory.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_RETAINED_BYTES = 1 << 30
_GLIBC_MAX_MMAP_THRESHOLD = 32 << 20  # the cap of older glibc versions (HEAP_MAX_SIZE / 2 on 64-bit)
_cpu_memory_settled = False
_outcome: str | None = None  # what retain_freed_cpu_memory did, once it ran


def _mallopt(parameter: int, value: int) -> bool:
    return bool(ctypes.CDLL(None).mallopt(ctypes.c_int(parameter), ctypes.c_int(value)))


def retain_freed_cpu_memory() -> None:
    """Once per process: stops glibc malloc from handing freed memory back to the operating system between calls,
    which makes CPU forwards and training steps of fused ensembles faster and can make their peak memory larger.

    A stacked weight, its gradient, oneDNN's reordered copy of a grouped convolution's weights, the optimizer's
    temporaries and the activations are N times a member's tensor. glibc serves blocks above its mmap threshold
    (adaptive, at most 32 MB) with a fresh mmap and frees them with munmap, and trims freed heap above its trim
    threshold: every call then page-faults that memory back in, which a member loop, whose tensors are N times
    smaller, mostly does not. This raises both thresholds to 1 GiB, so that such blocks come from the heap and stay
    in the process. The cost: the resident size stays at the peak of a call instead of dropping between calls, and
    the peak itself grows where large blocks of changing sizes fragment the heap (large activations: many members
    at a large batch).

    Off by default. It is made by this call, or, with ``FUSED_ENSEMBLE_KEEP_CPU_MEMORY=1``, by the first CPU forward
    of a fused ensemble and by ``optimize()`` before it times anything (``retain_for``). Left alone: non-glibc
    platforms, an allocator set up by the user (``MALLOC_*_`` variables, ``GLIBC_TUNABLES``, a preloaded
    jemalloc/tcmalloc/mimalloc) and ``FUSED_ENSEMBLE_KEEP_CPU_MEMORY=0``, which refuses this call too. ``outcome()``
    says which."""
    global _cpu_memory_settled, _outcome
    if _cpu_memory_settled:
        return
    _cpu_memory_settled = True
    if config.settings.keep_cpu_memory is False:
        _outcome = "left alone: FUSED_ENSEMBLE_KEEP_CPU_MEMORY=0"
    elif config.settings.allocator_configured_by_user:
        _outcome = "left alone: allocator configured by the user"
    elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _outcome = "left alone: not glibc"
    else:
        _outcome = _raise_thresholds()


def _raise_thresholds() -> str:
    try:
        # The mmap threshold first: setting either one turns off glibc's adaptive thresholds.
        mmap_threshold = _RETAINED_BYTES
        if not _mallopt(_M_MMAP_THRESHOLD, mmap_threshold):
            mmap_threshold = _GLIBC_MAX_MMAP_THRESHOLD
            if not _mallopt(_M_MMAP_THRESHOLD, mmap_threshold):
                return "left alone: mallopt refused the mmap threshold"
        _mallopt(_M_TRIM_THRESHOLD, _RETAINED_BYTES)
    except (OSError, AttributeError):  # no mallopt in this process's C library
        return "left alone: no mallopt"
    return f"glibc mmap threshold {mmap_threshold >> 20} MiB, trim threshold {_RETAINED_BYTES >> 20} MiB"


def retain_for(tensors: Iterable[object]) -> None:
    """``retain_freed_cpu_memory()`` if ``FUSED_ENSEMBLE_KEEP_CPU_MEMORY=1`` and any of ``tensors`` is a CPU tensor
    (cheap once settled, and when the setting is off). Fused forwards and ``optimize()`` call it."""
    if (not _cpu_memory_settled and config.settings.keep_cpu_memory
            and any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tensors)):
        retain_freed_cpu_memory()


def settled() -> bool:
    """Whether ``retain_freed_cpu_memory`` already ran in this process (whatever it decided)."""
    return _cpu_memory_settled


def outcome() -> str:
    """What ``retain_freed_cpu_memory`` did in this process, or why it has not run (benchmark results record it)."""
    if _outcome is not None:
        return _outcome
    if config.settings.keep_cpu_memory:
        return "not set yet: no CPU forward of a fused ensemble in this process"
    return "glibc's defaults: FUSED_ENSEMBLE_KEEP_CPU_MEMORY is not 1 and retain_freed_cpu_memory() was not called"
