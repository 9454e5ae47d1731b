"""FusedEnsemble's one-time glibc malloc setting for CPU forwards (fused_ensemble.cpu_memory)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fused_ensemble import FusedEnsemble, config
from fused_ensemble import cpu_memory as fused_module


@pytest.fixture
def mallopt_calls(monkeypatch):
    """Records mallopt calls instead of making them, with the once-per-process flag reset."""
    calls = []
    monkeypatch.setattr(fused_module, "_cpu_memory_settled", False)
    monkeypatch.setattr(fused_module, "_outcome", "not set yet")
    monkeypatch.setattr(fused_module, "_mallopt", lambda parameter, value: calls.append((parameter, value)) or True)
    monkeypatch.setattr(config, "settings", config.Settings.from_environment({}))  # no allocator variables
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
    assert mallopt_calls == [(fused_module._M_MMAP_THRESHOLD, fused_module._RETAINED_BYTES),
                             (fused_module._M_TRIM_THRESHOLD, fused_module._RETAINED_BYTES)]


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


@pytest.mark.parametrize("variable, value", [
    ("FUSED_ENSEMBLE_KEEP_CPU_MEMORY", "0"),
    ("MALLOC_TRIM_THRESHOLD_", "1000000"),
    ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1000000"),
    ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"),
])
def test_user_choices_are_respected(monkeypatch, mallopt_calls, variable, value):
    monkeypatch.setattr(config, "settings", config.Settings.from_environment({variable: value}))
    _fused()(torch.randn(3, 4, 5)).sum().backward()
    assert mallopt_calls == []
    assert fused_module.outcome().startswith("left alone")


def test_non_glibc_platforms_are_left_alone(monkeypatch, mallopt_calls):
    monkeypatch.setattr(fused_module.platform, "libc_ver", lambda: ("", ""))
    _fused()(torch.randn(3, 4, 5)).sum().backward()
    assert mallopt_calls == []


def test_real_mallopt_accepts_the_values_on_glibc():
    if fused_module.platform.system() != "Linux" or fused_module.platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    # What the first CPU forward of any test in this process sets anyway.
    assert (fused_module._mallopt(fused_module._M_MMAP_THRESHOLD, fused_module._RETAINED_BYTES)
            or fused_module._mallopt(fused_module._M_MMAP_THRESHOLD, fused_module._GLIBC_MAX_MMAP_THRESHOLD))
    assert fused_module._mallopt(fused_module._M_TRIM_THRESHOLD, fused_module._RETAINED_BYTES)
