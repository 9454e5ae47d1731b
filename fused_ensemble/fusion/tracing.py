"""Tracing a member's forward with torch.fx, once per mode."""

from __future__ import annotations

import torch.fx as fx
from torch import nn


def trace_member(stacked: nn.Module, training: bool) -> fx.Graph:
    """The forward of ``stacked`` (a member's module tree) traced in one mode: code that reads ``self.training`` is
    specialized per mode. Raises a TypeError saying what torch.fx could not trace."""
    was_training = stacked.training
    stacked.train(training)
    try:
        return fx.Tracer().trace(stacked)
    except Exception as error:
        raise TypeError(
            f"cannot fuse {type(stacked).__qualname__}: torch.fx could not trace its forward "
            f"({type(error).__name__}: {error}). FusedEnsemble needs a forward whose Python control flow does not "
            f"depend on tensor values (if/for over tensors, .item(), data-dependent shapes).") from error
    finally:
        stacked.train(was_training)
