"""Timing of candidate executions: what ``optimize()`` uses to choose, and what the benchmarks time with.

Wall times per call (CUDA events on CUDA), taken in interleaved rounds so that a machine whose speed drifts
favours none of the candidates. The benchmarks (``fused_ensemble.cli``, ``bench/``) import these; this module
imports nothing of theirs.

CPU timings read ``clock()``, looked up at each call: a test replaces it (``monkeypatch.setattr(timing, "clock",
fake)``) to decide which candidate is faster without depending on the machine's load. CUDA timings use events.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def clock() -> float:
    """Seconds, for CPU timings: ``time.perf_counter()``."""
    return time.perf_counter()


def time_ms(fn: Callable[[], object], device: str, reps: int, warmup: int = 1) -> list[float]:
    """Wall times in ms of ``reps`` calls after ``warmup`` calls, under no_grad (CPU: ``clock()`` around each call;
    CUDA: events)."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if device.startswith("cuda"):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                start_s = clock()
                fn()
                times.append((clock() - start_s) * 1e3)
    return times


def interleaved_times(fns: dict[str, Callable[[], object]], device: str, min_reps: int, budget_ms: float = 500.0,
                      rounds: int = 5, max_reps: int = 200) -> dict[str, list[float]]:
    """Wall times in ms of every function of ``fns`` (as ``time_ms``), taken in ``rounds`` rounds that each call
    every function in turn. A machine that slows down or speeds up while it is measured (a shared CPU, clock
    changes) then shifts all functions' times alike, instead of favouring the one that ran in a quiet moment.
    Each function gets at least ``min_reps`` calls and, when calls are fast, about ``budget_ms`` of them (at most
    ``max_reps``), sized by one call after a warm-up call: a handful of 1 ms calls on a shared CPU gives a median
    that moves by 10-30% between runs."""
    once = {name: median(time_ms(fn, device, 1, warmup=1)) for name, fn in fns.items()}
    reps = {name: max(min_reps, min(max_reps, int(budget_ms / max(ms, 1e-3)))) for name, ms in once.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_index in range(rounds):
        for name, fn in fns.items():
            # Round r makes calls [r * reps / rounds, (r + 1) * reps / rounds): reps in all, at least one a round.
            calls = max(1, (round_index + 1) * reps[name] // rounds - round_index * reps[name] // rounds)
            times[name] += time_ms(fn, device, calls, warmup=0)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)
