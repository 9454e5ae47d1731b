"""The embedding rule against the member loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fused_ensemble import FusedEnsemble

from layer_checks import BATCH, N, check_layer
from member_factories import make_members

# ---- embedding -----------------------------------------------------------------------------------------------

def draw_indices(member_inputs: bool, num_embeddings: int = 7, padding_idx: int | None = None) -> torch.Tensor:
    indices = torch.randint(0, num_embeddings, ((N,) if member_inputs else ()) + (BATCH, 5))
    if padding_idx is not None:
        indices[..., 0] = padding_idx  # make sure the padding row is read
    return indices


def test_embedding():
    check_layer(lambda: nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 3)), draw=draw_indices)


@pytest.mark.parametrize("member_inputs", [False, True], ids=["shared", "member_inputs"])
def test_embedding_padding_row_gets_no_gradient(member_inputs):
    factory = lambda: nn.Sequential(nn.Embedding(7, 4, padding_idx=2), nn.Tanh())  # noqa: E731
    check_layer(factory, draw=lambda m: draw_indices(m, padding_idx=2), modes=(member_inputs,))
    fused = FusedEnsemble(make_members(factory), reduction="none", member_inputs=member_inputs)
    fused(draw_indices(member_inputs, padding_idx=2)).square().sum().backward()
    grad = fused.stacked[0].weight.grad
    assert not grad[:, 2].any() and grad.any()


def test_embedding_scale_grad_by_freq_is_refused():
    members = [nn.Sequential(nn.Embedding(7, 4, scale_grad_by_freq=True), nn.Tanh()) for _ in range(2)]
    with pytest.raises(TypeError, match=r"layer '0' \(Embedding\).*scale_grad_by_freq"):
        FusedEnsemble(members)
