"""Fixtures of the command tests."""

import pytest

from fused_ensemble.cli import train as train_command


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if the train command starts training."""
    def train_epoch(*args, **kwargs):
        pytest.fail("the command started training")
    monkeypatch.setattr(train_command, "train_epoch", train_epoch)
