"""Errors raised inside the fused forward speak of the member: the layer's path and the member's shapes, not the
fused op's N x C channels or stacked tables."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from fused_ensemble import FusedEnsemble
from fused_ensemble.cli.models import CifarResNet18

from member_factories import make_members


def raised(fused, *inputs, error=ValueError) -> str:
    with pytest.raises(error) as caught:
        fused(*inputs)
    return str(caught.value)


@pytest.mark.parametrize("member_inputs", [False, True], ids=["shared", "member_inputs"])
def test_a_channel_mismatch_in_a_convolution(member_inputs):
    class TwoConvs(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 32, 3)
            self.conv2 = nn.Conv2d(64, 8, 3)

        def forward(self, x):
            return self.conv2(self.conv1(x))

    fused = FusedEnsemble(make_members(TwoConvs), member_inputs=member_inputs)
    x = torch.randn((2, 1, 3, 8, 8) if member_inputs else (1, 3, 8, 8))
    assert raised(fused, x) == "layer 'conv2' (Conv2d): expected input with 64 channels per member, got 32"
    x = torch.randn((2, 1, 4, 8, 8) if member_inputs else (1, 4, 8, 8))
    assert raised(fused, x) == "layer 'conv1' (Conv2d): expected input with 3 channels per member, got 4"


def test_a_channel_mismatch_deep_in_a_resnet():
    members = make_members(lambda: CifarResNet18(width=8), n=2)
    for member in members:  # as members built with a wrong width would be
        member.layer1[0].conv1 = nn.Conv2d(16, 8, 3, padding=1, bias=False)
    fused = FusedEnsemble(members)
    assert raised(fused, torch.randn(1, 3, 16, 16)) == ("layer 'layer1.0.conv1' (Conv2d): expected input with 16 "
                                                         "channels per member, got 8")


@pytest.mark.parametrize("layer, shape, message", [
    (lambda: nn.ConvTranspose2d(4, 2, 3), (3, 5, 5), "expected input with 4 channels per member, got 3"),
    (lambda: nn.Conv1d(6, 4, 3, groups=2), (4, 9), "expected input with 6 channels per member, got 4"),
    (lambda: nn.Linear(5, 2), (4,), "expected input with 5 features (last dim) per member, got 4"),
    (lambda: nn.BatchNorm1d(5), (4,), "expected input with 5 channels per member, got 4"),
    (lambda: nn.GroupNorm(2, 6), (4, 3), "expected input with 6 channels per member, got 4"),
    (lambda: nn.LayerNorm((3, 4)), (4, 3), "expected input whose last dims are (3, 4) per member, got (4, 3)"),
], ids=["conv-transpose", "grouped-conv1d", "linear", "batchnorm", "groupnorm", "layernorm"])
@pytest.mark.parametrize("member_inputs", [False, True], ids=["shared", "member_inputs"])
def test_shape_mismatches_of_other_layers(layer, shape, message, member_inputs):
    fused = FusedEnsemble(make_members(lambda: nn.Sequential(nn.Identity(), layer())), member_inputs=member_inputs,
                          reduction="none")
    x = torch.randn(((2,) if member_inputs else ()) + (3, *shape))
    assert raised(fused, x) == f"layer '1' ({type(layer()).__name__}): {message}"


@pytest.mark.parametrize("member_inputs", [False, True], ids=["shared", "member_inputs"])
@pytest.mark.parametrize("index", [-1, 10, 12])
def test_an_embedding_index_out_of_range(index, member_inputs):
    fused = FusedEnsemble(make_members(lambda: nn.Sequential(nn.Embedding(10, 4), nn.Tanh())), reduction="none",
                          member_inputs=member_inputs)
    indices = torch.tensor([[1, 2, index]] * (2 if member_inputs else 1)).view((2, 1, 3) if member_inputs else (1, 3))
    if member_inputs:
        indices[0, 0, 2] = 3  # only member 1 reads out of range
    expected = f"layer '0' (Embedding): index {index} is out of range for an embedding of 10 rows (0 <= index < 10)"
    with pytest.raises(IndexError, match=re.escape(expected)):
        fused(indices)


def test_an_embedding_index_in_a_single_layer_member():
    fused = FusedEnsemble(make_members(lambda: nn.Embedding(10, 4)), reduction="none")
    with pytest.raises(IndexError, match=re.escape("the member layer (Embedding): index -3 is out of range")):
        fused(torch.tensor([[-3]]))
