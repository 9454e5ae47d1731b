"""Fixtures of the rule tests."""

import pytest
import torch


@pytest.fixture
def vmapped_layers(monkeypatch):
    """The type names of the layers run through vmap(functional_call), in call order."""
    calls = []
    real_call = torch.func.functional_call

    def recording_call(module, *args, **kwargs):
        calls.append(type(module).__name__)
        return real_call(module, *args, **kwargs)
    monkeypatch.setattr(torch.func, "functional_call", recording_call)
    return calls
