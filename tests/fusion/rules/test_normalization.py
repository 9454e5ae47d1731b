"""The normalization rules (BatchNorm, GroupNorm, InstanceNorm, LayerNorm, RMSNorm) and PReLU against the member
loop."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fused_ensemble import FusedEnsemble

from layer_checks import check_layer, draw_input
from member_factories import make_members, member_loop

# ---- normalization -------------------------------------------------------------------------------------------

BATCH_NORMS = {
    "bn1d-2d-input": (lambda: nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6)), (5,)),
    "bn1d-2d-input-first-layer": (lambda: nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 3)), (5,)),
    "bn1d-3d-input": (lambda: nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4)), (3, 7)),
    "bn1d-3d-input-first-layer": (lambda: nn.Sequential(nn.BatchNorm1d(3), nn.Conv1d(3, 4, 3)), (3, 7)),
    "bn2d": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), (3, 6, 6)),
    "bn2d-no-affine": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False)), (3, 6, 6)),
    "bn2d-no-running-stats": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)), (3, 6, 6)),
    "bn2d-momentum-none": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None)), (3, 6, 6)),
    "bn2d-eps-momentum": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=1e-3, momentum=0.3)), (3, 6, 6)),
    "bn3d": (lambda: nn.Sequential(nn.Conv3d(2, 3, 2), nn.BatchNorm3d(3)), (2, 3, 4, 4)),
}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", BATCH_NORMS)
def test_batch_norm(name, training):
    factory, shape = BATCH_NORMS[name]
    check_layer(factory, shape, training=training)


NORMS = {
    "layernorm": (lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8)), (6,)),
    "layernorm-no-affine": (lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8, elementwise_affine=False)),
                            (6,)),
    "layernorm-no-bias": (lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8, bias=False)), (6,)),
    "layernorm-first-layer-3d": (lambda: nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 3)), (4, 6)),
    "layernorm-over-conv-channels": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.LayerNorm([4, 3, 3])),
                                     (2, 5, 5)),
    "groupnorm": (lambda: nn.Sequential(nn.Conv2d(3, 6, 3), nn.GroupNorm(3, 6)), (3, 6, 6)),
    "groupnorm-no-affine-1d": (lambda: nn.Sequential(nn.Conv1d(3, 6, 3), nn.GroupNorm(2, 6, affine=False)),
                               (3, 7)),
    "groupnorm-first-layer": (lambda: nn.Sequential(nn.GroupNorm(2, 4), nn.Conv2d(4, 3, 1)), (4, 5, 5)),
}


@pytest.mark.parametrize("name", NORMS)
def test_layer_and_group_norm(name):
    factory, shape = NORMS[name]
    check_layer(factory, shape, training=True)


NORMS_AND_SLOPES = {
    "prelu-per-channel": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.PReLU(4)), (3, 5, 5)),
    "prelu-one-slope-first-layer": (lambda: nn.Sequential(nn.PReLU()), (3, 5, 5)),
    "prelu-linear": (lambda: nn.Sequential(nn.Linear(6, 5), nn.PReLU(5)), (6,)),
    "instance-norm-affine": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, affine=True)), (3, 5, 5)),
    "instance-norm1d-running-stats": (lambda: nn.Sequential(
        nn.Conv1d(3, 4, 3), nn.InstanceNorm1d(4, affine=True, track_running_stats=True)), (3, 9)),
    "instance-norm3d-first-layer": (lambda: nn.Sequential(nn.InstanceNorm3d(2)), (2, 3, 4, 4)),
    "rms-norm": (lambda: nn.Sequential(nn.Linear(6, 8), nn.RMSNorm(8)), (4, 6)),
    "rms-norm-no-weight-first-layer": (lambda: nn.Sequential(nn.RMSNorm([4, 6], elementwise_affine=False)),
                                       (4, 6)),
}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", NORMS_AND_SLOPES)
def test_prelu_instance_and_rms_norm(name, training):
    factory, shape = NORMS_AND_SLOPES[name]
    check_layer(factory, shape, training=training)


def test_instance_norm_running_statistics_update_as_in_the_loop():
    members = make_members(lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, track_running_stats=True)),
                           n=3, seed=11, training=True)
    fused = FusedEnsemble(copy.deepcopy(members), reduction="none", member_inputs=True)
    for _ in range(2):
        x = draw_input((3, 6, 6), True, n=3)
        fused(x)
        member_loop(members, x, True)
    for index, (ours, theirs) in enumerate(zip(fused.to_members(), members)):
        for (name, got), expected in zip(ours.named_buffers(), theirs.buffers()):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"member {index} {name}: {m}")
    assert not torch.equal(fused.to_members()[0][1].running_mean, fused.to_members()[1][1].running_mean)


@pytest.mark.parametrize("norm", [lambda: nn.LayerNorm(8), lambda: nn.RMSNorm(8)], ids=["layer_norm", "rms_norm"])
def test_norms_keep_the_autocast_dtype(norm):
    """Under CPU autocast layer_norm returns bfloat16 (as nn.LayerNorm does): the per-member affine must not promote
    it back to float32."""
    members = make_members(lambda: nn.Sequential(nn.Linear(8, 8), norm()), n=2, seed=12)
    x = draw_input((8,), False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = FusedEnsemble(members, reduction="none")(x)
        ref = member_loop(members, x)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
