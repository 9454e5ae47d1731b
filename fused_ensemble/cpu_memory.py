"""A one-time glibc malloc setting for training stacked ensembles on the CPU (see ``retain_freed_cpu_memory``):
the fused CIFAR ResNet-18 step at N=4, batch 2, went from 294 to 163 ms on a 2-core VM (the member loop: 150 ms)."""

from __future__ import annotations

import ctypes
import os
import platform

# glibc's mallopt parameters (malloc.h) and the values used while training on the CPU; see retain_freed_cpu_memory.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_RETAINED_BYTES = 1 << 30
_GLIBC_MAX_MMAP_THRESHOLD = 32 << 20  # the cap of older glibc versions (HEAP_MAX_SIZE / 2 on 64-bit)
_KEEP_CPU_MEMORY_VARIABLE = "FUSED_ENSEMBLE_KEEP_CPU_MEMORY"
_cpu_memory_settled = False


def _mallopt(parameter: int, value: int) -> bool:
    return bool(ctypes.CDLL(None).mallopt(ctypes.c_int(parameter), ctypes.c_int(value)))


def _allocator_configured_by_user() -> bool:
    environment = os.environ
    if any(name in environment for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")):
        return True
    if "glibc.malloc" in environment.get("GLIBC_TUNABLES", ""):
        return True
    preload = environment.get("LD_PRELOAD", "")
    return any(allocator in preload for allocator in ("jemalloc", "tcmalloc", "mimalloc"))


def retain_freed_cpu_memory() -> None:
    """Once per process, before the first CPU training step: stops glibc malloc from handing freed memory back to
    the operating system between steps.

    A stacked parameter, its gradient and the optimizer's temporaries are N times a member's tensor (37.7 MB for one
    ResNet-18 layer at N=4). glibc serves blocks above its mmap threshold (adaptive, at most 32 MB) with a fresh mmap
    and frees them with munmap, and trims freed heap above its trim threshold: every step then page-faults its
    gradients and activations back in (ResNet-18, N=4, B=2 on a 2-core VM: 70k page faults, a third to half of the
    step), which a member loop, whose tensors are N times smaller, does not. Raising both thresholds to 1 GiB keeps
    that memory in the process (as jemalloc or tcmalloc would): the resident size stays at the step's peak instead of
    dropping between steps, and nothing else changes (measured peak RSS: the same).

    Left alone: non-glibc platforms, an allocator set up by the user (``MALLOC_*_`` variables, ``GLIBC_TUNABLES``,
    a preloaded jemalloc/tcmalloc/mimalloc) and ``FUSED_ENSEMBLE_KEEP_CPU_MEMORY=0``."""
    global _cpu_memory_settled
    _cpu_memory_settled = True
    if os.environ.get(_KEEP_CPU_MEMORY_VARIABLE, "1") == "0" or _allocator_configured_by_user():
        return
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    try:
        # The mmap threshold first: setting either one turns off glibc's adaptive thresholds.
        if not _mallopt(_M_MMAP_THRESHOLD, _RETAINED_BYTES):
            _mallopt(_M_MMAP_THRESHOLD, _GLIBC_MAX_MMAP_THRESHOLD)
        _mallopt(_M_TRIM_THRESHOLD, _RETAINED_BYTES)
    except (OSError, AttributeError):  # no mallopt in this process's C library
        pass


def settled() -> bool:
    """Whether ``retain_freed_cpu_memory`` already ran in this process."""
    return _cpu_memory_settled
