"""The opt-in glibc malloc setting for CPU forwards (fused_ensemble.cpu_memory), with mallopt mocked."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from fused_ensemble import FusedEnsemble, config
from fused_ensemble import cpu_memory as fused_module

KEEP = "FUSED_ENSEMBLE_KEEP_CPU_MEMORY"
BOTH_THRESHOLDS = [(fused_module._M_MMAP_THRESHOLD, fused_module._RETAINED_BYTES),
                   (fused_module._M_TRIM_THRESHOLD, fused_module._RETAINED_BYTES)]


def _use_environment(monkeypatch, environment: dict[str, str]) -> None:
    monkeypatch.setattr(config, "settings", config.Settings.from_environment(environment))


@pytest.fixture
def mallopt_calls(monkeypatch):
    """Records mallopt calls instead of making them, with the once-per-process flag reset, on glibc, and with
    ``FUSED_ENSEMBLE_KEEP_CPU_MEMORY=1`` (and no allocator variables)."""
    calls = []
    monkeypatch.setattr(fused_module, "_cpu_memory_settled", False)
    monkeypatch.setattr(fused_module, "_outcome", None)
    monkeypatch.setattr(fused_module, "_mallopt", lambda parameter, value: calls.append((parameter, value)) or True)
    _use_environment(monkeypatch, {KEEP: "1"})
    monkeypatch.setattr(fused_module.platform, "system", lambda: "Linux")
    monkeypatch.setattr(fused_module.platform, "libc_ver", lambda: ("glibc", "2.36"))
    return calls


def _fused() -> FusedEnsemble:
    return FusedEnsemble([nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2)) for _ in range(3)],
                         reduction="none", member_inputs=True)


def test_first_cpu_training_forward_raises_both_thresholds_once(mallopt_calls):
    fused = _fused()
    x = torch.randn(3, 4, 5)
    fused(x).sum().backward()
    fused(x).sum().backward()
    assert mallopt_calls == BOTH_THRESHOLDS


def test_older_glibc_cap_on_the_mmap_threshold_is_used_when_one_gib_is_refused(monkeypatch, mallopt_calls):
    def refuse_large(parameter, value):
        mallopt_calls.append((parameter, value))
        return value <= fused_module._GLIBC_MAX_MMAP_THRESHOLD or parameter != fused_module._M_MMAP_THRESHOLD
    monkeypatch.setattr(fused_module, "_mallopt", refuse_large)
    _fused()(torch.randn(3, 4, 5))
    assert (fused_module._M_MMAP_THRESHOLD, fused_module._GLIBC_MAX_MMAP_THRESHOLD) in mallopt_calls


def test_inference_forward_settles_the_allocator_too(mallopt_calls):
    with torch.no_grad():
        _fused()(torch.randn(3, 4, 5))
    assert len(mallopt_calls) == 2
    assert fused_module.settled()
    assert fused_module.outcome().startswith("glibc mmap threshold 1024 MiB")


def test_optimize_settles_the_allocator_before_tuning(mallopt_calls):
    fused = FusedEnsemble([nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2)) for _ in range(3)]).eval()
    fused.optimize(torch.randn(4, 5))
    assert len(mallopt_calls) == 2


def test_only_cpu_tensors_settle_it(mallopt_calls):
    fused_module.retain_for([torch.empty(2, device="meta"), "not a tensor"])
    assert mallopt_calls == [] and not fused_module.settled()
    fused_module.retain_for([torch.empty(2)])
    assert len(mallopt_calls) == 2


@pytest.mark.parametrize("value, expected", [("1", True), ("0", False), ("", None), ("yes", None)])
def test_the_switch_is_read_as_on_off_or_unset(value, expected):
    assert config.Settings.from_environment({KEEP: value}).keep_cpu_memory is expected
    assert config.Settings.from_environment({}).keep_cpu_memory is None


@pytest.mark.parametrize("environment", [{}, {KEEP: "0"}, {KEEP: "true"}], ids=["unset", "zero", "other"])
def test_off_by_default_forwards_and_optimize_leave_glibc_alone(monkeypatch, mallopt_calls, environment):
    _use_environment(monkeypatch, environment)
    x = torch.randn(3, 4, 5)
    _fused()(x).sum().backward()
    FusedEnsemble([nn.Linear(5, 2) for _ in range(3)]).eval().optimize(x[0])
    assert mallopt_calls == []
    assert not fused_module.settled()
    assert fused_module.outcome().startswith("glibc's defaults")


def test_an_explicit_call_makes_the_setting_while_the_switch_is_unset(monkeypatch, mallopt_calls):
    _use_environment(monkeypatch, {})
    fused_module.retain_freed_cpu_memory()
    fused_module.retain_freed_cpu_memory()
    assert mallopt_calls == BOTH_THRESHOLDS
    assert fused_module.settled()
    assert fused_module.outcome() == "glibc mmap threshold 1024 MiB, trim threshold 1024 MiB"


def test_outcome_before_the_first_forward_says_that_it_is_pending(mallopt_calls):
    assert fused_module.outcome().startswith("not set yet")
    _fused()(torch.randn(3, 4, 5))
    assert fused_module.outcome().startswith("glibc mmap threshold")


@pytest.mark.parametrize("variable, value", [
    (KEEP, "0"),
    ("MALLOC_TRIM_THRESHOLD_", "1000000"),
    ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1000000"),
    ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"),
])
def test_user_choices_are_respected_by_explicit_calls_too(monkeypatch, mallopt_calls, variable, value):
    _use_environment(monkeypatch, {KEEP: "1", variable: value})
    _fused()(torch.randn(3, 4, 5)).sum().backward()
    fused_module.retain_freed_cpu_memory()
    assert mallopt_calls == []
    assert fused_module.outcome().startswith("left alone")


def test_non_glibc_platforms_are_left_alone(monkeypatch, mallopt_calls):
    monkeypatch.setattr(fused_module.platform, "libc_ver", lambda: ("", ""))
    _fused()(torch.randn(3, 4, 5)).sum().backward()
    assert mallopt_calls == []


def test_real_mallopt_accepts_the_values_on_glibc():
    if fused_module.platform.system() != "Linux" or fused_module.platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    # In a child process: the setting is process-wide, and this one runs with glibc's defaults.
    environment = {name: value for name, value in os.environ.items()
                   if name != KEEP and not name.startswith("MALLOC_") and name not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    script = "from fused_ensemble import cpu_memory; cpu_memory.retain_freed_cpu_memory(); print(cpu_memory.outcome())"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment, check=True)
    assert done.stdout.strip().startswith("glibc mmap threshold"), done.stdout
