"""A one-time glibc malloc setting for running stacked ensembles on the CPU (see ``retain_freed_cpu_memory``;
what it does to the numbers: docs/performance.md, "The CPU allocator")."""

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
_outcome = "not set yet: no CPU forward of a fused ensemble in this process"


def _mallopt(parameter: int, value: int) -> bool:
    return bool(ctypes.CDLL(None).mallopt(ctypes.c_int(parameter), ctypes.c_int(value)))


def retain_freed_cpu_memory() -> None:
    """Once per process, before the first CPU forward of a fused ensemble: stops glibc malloc from handing freed
    memory back to the operating system between calls.

    A stacked weight, its gradient, oneDNN's reordered copy of a grouped convolution's weights and the optimizer's
    temporaries are N times a member's tensor. glibc serves blocks above its mmap threshold (adaptive, at most
    32 MB) with a fresh mmap and frees them with munmap, and trims freed heap above its trim threshold: every call
    then page-faults that memory back in, which a member loop, whose tensors are N times smaller, mostly does not.
    Raising both thresholds to 1 GiB keeps that memory in the process (as jemalloc or tcmalloc would): the resident
    size stays at the peak of a call instead of dropping between calls, and nothing else changes (the peak RSS
    stays the same).

    Left alone: non-glibc platforms, an allocator set up by the user (``MALLOC_*_`` variables, ``GLIBC_TUNABLES``,
    a preloaded jemalloc/tcmalloc/mimalloc) and ``FUSED_ENSEMBLE_KEEP_CPU_MEMORY=0``. ``outcome()`` says which."""
    global _cpu_memory_settled, _outcome
    if _cpu_memory_settled:
        return
    _cpu_memory_settled = True
    if not config.settings.keep_cpu_memory:
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
    """``retain_freed_cpu_memory()`` if any of ``tensors`` is a CPU tensor (cheap once settled)."""
    if not _cpu_memory_settled and any(isinstance(t, torch.Tensor) and t.device.type == "cpu"
                                       for t in tensors):
        retain_freed_cpu_memory()


def settled() -> bool:
    """Whether ``retain_freed_cpu_memory`` already ran in this process."""
    return _cpu_memory_settled


def outcome() -> str:
    """What ``retain_freed_cpu_memory`` did in this process (benchmark results record it)."""
    return _outcome
