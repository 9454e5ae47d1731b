"""The experimental per-member convolution backward (fused_ensemble/conv_backward.py) gives the grouped
backward's gradients, and training with it stays exact against the member loop."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fused_ensemble import FusedEnsemble, conv_backward
from fused_ensemble.cli.models import CifarResNet18

from member_factories import assert_grads_match, assert_matches, make_members, member_loop


class Convolutions(nn.Module):
    """Strides, dilation, grouped and depthwise convolutions, bias and a padding mode, 1D to 3D."""

    def __init__(self, three_d: bool = True):
        super().__init__()
        self.conv2d = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.Conv2d(8, 8, 3, stride=2, dilation=2, padding=2, groups=2, bias=False),
            nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect"),
            nn.Conv2d(8, 6, 1, padding="same"))
        self.conv1d = nn.Conv1d(6, 4, 3, stride=2)
        self.conv3d = nn.Conv3d(1, 2, (1, 3, 3), padding=(0, 1, 1)) if three_d else None

    def forward(self, x):
        y = self.conv2d(x)                      # [B, 6, 4, 4]
        z = self.conv1d(y.flatten(2)).flatten(1)  # [B, 4 * 7]
        if self.conv3d is None:
            return z
        return self.conv3d(y[:, None]).flatten(1).sum(1, keepdim=True) + z


def count_per_member_backwards(out: torch.Tensor) -> int:
    seen, stack, count = set(), [out.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += type(node).__name__ == "_PerMemberBackwardBackward"
        stack.extend(next_node for next_node, _ in node.next_functions)
    return count


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("member_inputs", [False, True], ids=["shared", "member_inputs"])
def test_per_member_backward_gives_the_loops_gradients(member_inputs, memory_format):
    # channels_last applies to 4-D weights only: nn.Module.to raises on a Conv3d's, as it would for a member.
    three_d = memory_format == torch.contiguous_format
    members = make_members(lambda: Convolutions(three_d), n=3, seed=1, training=True)
    fused = FusedEnsemble(copy.deepcopy(members), reduction="none", member_inputs=member_inputs)
    fused.to(memory_format=memory_format)
    x = torch.randn(3, 2, 3, 8, 8) if member_inputs else torch.randn(2, 3, 8, 8)
    x = x.requires_grad_()
    with conv_backward("per_member"):
        out = fused(x)
    # Every convolution but the dense first layer on a shared input and the one with padding="same" (string
    # paddings keep the grouped backward).
    assert count_per_member_backwards(out) == 3 + member_inputs + three_d
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    fused_input_grad = x.grad.clone()
    x.grad = None
    expected = member_loop(members, x, member_inputs)
    assert_matches(out, expected)
    (expected * weights).sum().backward()
    assert_matches(fused_input_grad, x.grad)
    assert_grads_match(fused, members)


def test_training_steps_with_the_per_member_backward_track_the_loop():
    members = make_members(lambda: CifarResNet18(width=8), n=2, seed=2, training=True)
    fused = FusedEnsemble(copy.deepcopy(members), reduction="none", member_inputs=True)
    fused_optimizer = torch.optim.SGD(fused.parameters(), lr=0.1, momentum=0.9)
    loop_optimizer = torch.optim.SGD([p for m in members for p in m.parameters()], lr=0.1, momentum=0.9)
    for _ in range(2):
        x, y = torch.randn(2, 4, 3, 16, 16), torch.randint(0, 10, (2, 4))
        fused_optimizer.zero_grad(), loop_optimizer.zero_grad()
        with conv_backward("per_member"):
            out = fused(x)
        nn.functional.cross_entropy(out.flatten(0, 1), y.flatten()).backward()
        nn.functional.cross_entropy(member_loop(members, x, True).flatten(0, 1), y.flatten()).backward()
        fused_optimizer.step(), loop_optimizer.step()
    for index, member in enumerate(fused.to_members()):
        for name, value in member.state_dict().items():
            if value.is_floating_point():
                assert_matches(value, members[index].state_dict()[name])


def test_per_member_backward_under_cpu_autocast():
    # Autocast casts inside a Function's forward only: without casting first, the backward ran float32 tensors
    # against bfloat16 gradients (oneDNN refused them).
    members = make_members(lambda: CifarResNet18(width=8), n=2, seed=5, training=True)
    grads = {}
    for mode in ("grouped", "per_member"):
        fused = FusedEnsemble(copy.deepcopy(members), reduction="none", member_inputs=True)
        x = torch.randn(2, 4, 3, 16, 16, generator=torch.Generator().manual_seed(6))
        with torch.autocast("cpu", dtype=torch.bfloat16), conv_backward(mode):
            out = fused(x)
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
        grads[mode] = [p.grad for p in fused.parameters()]
    for grouped, per_member in zip(grads["grouped"], grads["per_member"]):
        assert per_member.dtype == torch.float32
        torch.testing.assert_close(per_member, grouped, rtol=2e-2, atol=2e-2 * grouped.abs().max().item())


def test_the_mode_is_scoped_and_checked():
    from fused_ensemble.config import conv_backward_mode

    assert conv_backward_mode() == "grouped"
    with conv_backward("per_member"):
        assert conv_backward_mode() == "per_member"
    assert conv_backward_mode() == "grouped"
    with pytest.raises(ValueError, match="unknown conv backward mode 'dense'"):
        with conv_backward("dense"):
            pass


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_member_backward_on_cuda_channels_last(dtype):
    """cuDNN's dense backwards on the strided channel slices of NHWC activations (the layout the H100 training
    runs use) give the grouped backward's gradients."""
    members = make_members(lambda: CifarResNet18(width=8), n=3, seed=3, training=True)
    grads = {}
    for mode in ("grouped", "per_member"):
        fused = FusedEnsemble(copy.deepcopy(members), reduction="none", member_inputs=True)
        fused = fused.cuda().to(memory_format=torch.channels_last)
        torch.manual_seed(4)
        x = torch.randn(3, 8, 16, 16, 3, device="cuda").permute(0, 1, 4, 2, 3)  # each member's slice NHWC
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16), conv_backward(mode):
            out = fused(x)
        out.float().square().sum().backward()
        grads[mode] = [p.grad.float() for p in fused.parameters()]
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    for grouped, per_member in zip(grads["grouped"], grads["per_member"]):
        torch.testing.assert_close(per_member, grouped, rtol=tolerance, atol=tolerance * grouped.abs().max().item())
