"""Per-member gradient clipping against torch.nn.utils.clip_grad_norm_ on each member alone."""

import math

import pytest
import torch

from fused_ensemble.training.clip_grad import clip_grad_norm_, clip_grads_with_norm_, member_grad_norms

N = 4
SHAPES = [(5, 3), (5,), (2, 3, 3, 3), ()]  # one member's parameters; () stacks to a [N] parameter
GRAD_SCALES = [1e-3, 1.0, 30.0, 3.0]  # members far below, near and far above the limits used


def members_with_grads(seed=0):
    generator = torch.Generator().manual_seed(seed)
    members = []
    for scale in GRAD_SCALES:
        params = [torch.randn(s, generator=generator).requires_grad_() for s in SHAPES]
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator) * scale
        members.append(params)
    return members


def stacked_with_grads(members):
    stacked = [torch.stack([m[j].detach() for m in members]).requires_grad_() for j in range(len(SHAPES))]
    for j, p in enumerate(stacked):
        p.grad = torch.stack([m[j].grad for m in members])
    return stacked


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
@pytest.mark.parametrize("max_norm", [2.0, [0.5, 2.0, 100.0, 1.0]], ids=["shared", "per_member"])
def test_each_member_is_clipped_as_alone(norm_type, max_norm):
    members = members_with_grads()
    stacked = stacked_with_grads(members)
    norms = clip_grad_norm_(stacked, max_norm, norm_type=norm_type)
    assert norms.shape == (N,)
    clipped = []
    for i, member in enumerate(members):
        limit = max_norm[i] if isinstance(max_norm, list) else max_norm
        expected = torch.nn.utils.clip_grad_norm_(member, limit, norm_type=norm_type)
        torch.testing.assert_close(norms[i], expected, rtol=1e-6, atol=0, msg=lambda s: f"member {i}: {s}")
        clipped.append(bool(expected > limit))
        for j, p in enumerate(stacked):
            torch.testing.assert_close(p.grad[i], member[j].grad, rtol=2e-6, atol=1e-9,
                                       msg=lambda s: f"member {i}, parameter {j}: {s}")
    assert any(clipped) and not all(clipped), "the test must clip some members and leave others"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_members_below_the_limit_are_bitwise_unchanged(device):
    stacked = []
    for p in stacked_with_grads(members_with_grads()):
        stacked.append(p.detach().to(device).requires_grad_())
        stacked[-1].grad = p.grad.to(device)
    before = [p.grad.clone() for p in stacked]
    clip_grad_norm_(stacked, [1e9, 1e9, 1e-3, 1e9])
    for p, g in zip(stacked, before):
        assert torch.equal(p.grad[[0, 1, 3]], g[[0, 1, 3]])
        assert not torch.equal(p.grad[2], g[2])


def test_any_gradient_layout_and_a_generator_of_parameters():
    stacked = stacked_with_grads(members_with_grads())
    expected_norms = member_grad_norms(stacked)
    conv = stacked[2]
    # channels_last member slices, and a layout with the member dim innermost: only the values matter.
    for layout in (lambda g: g.permute(0, 2, 3, 4, 1).contiguous().permute(0, 4, 1, 2, 3),
                   lambda g: g.movedim(0, -1).contiguous().movedim(-1, 0)):
        conv.grad = layout(conv.grad.clone())
        torch.testing.assert_close(member_grad_norms(iter(stacked)), expected_norms, rtol=1e-6, atol=0)
    copy = [p.detach().clone().requires_grad_() for p in stacked]
    for p, q in zip(copy, stacked):
        p.grad = q.grad.clone()
    clip_grad_norm_((p for p in stacked), 1.0)  # a generator is read twice (norms, then scaling)
    clip_grad_norm_(copy, 1.0)
    for p, q in zip(copy, stacked):
        assert torch.equal(p.grad, q.grad)
    assert (member_grad_norms(stacked) < 1.0 + 1e-5).all()


def test_manual_two_step_form_and_parameters_without_gradients():
    stacked = stacked_with_grads(members_with_grads())
    extra = torch.zeros(N, 7, requires_grad=True)  # no .grad: skipped, as by torch
    copy = [p.detach().clone().requires_grad_() for p in stacked]
    for p, q in zip(copy, stacked):
        p.grad = q.grad.clone()
    norms = member_grad_norms([*stacked, extra])
    clip_grads_with_norm_([*stacked, extra], 1.5, norms)
    torch.testing.assert_close(clip_grad_norm_(copy, 1.5), norms)
    for p, q in zip(copy, stacked):
        assert torch.equal(p.grad, q.grad)
    assert member_grad_norms([extra]).numel() == 0 and clip_grad_norm_([extra], 1.0).numel() == 0


def test_nonfinite_norms_name_the_members():
    stacked = stacked_with_grads(members_with_grads())
    stacked[1].grad[2, 0] = float("nan")
    stacked[0].grad[3, 1, 1] = float("inf")
    norms = member_grad_norms(stacked)
    assert torch.isfinite(norms[:2]).all() and not torch.isfinite(norms[2:]).any()
    with pytest.raises(RuntimeError, match=r"member\(s\) \[2, 3\] of 4"):
        clip_grad_norm_(stacked, 1.0, error_if_nonfinite=True)


def test_errors_name_the_problem():
    stacked = stacked_with_grads(members_with_grads())
    odd = torch.zeros(N + 1, 3, requires_grad=True)
    odd.grad = torch.ones(N + 1, 3)
    with pytest.raises(ValueError, match="member index as dim 0"):
        member_grad_norms([*stacked, odd])
    with pytest.raises(ValueError, match="max_norm has 2 values, but the ensemble has 4 members"):
        clip_grad_norm_(stacked, [1.0, 2.0])
    with pytest.raises(ValueError, match="member 1: max_norm=-1.0"):
        clip_grad_norm_(stacked, [1.0, -1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"member_norms must have shape \(4,\)"):
        clip_grads_with_norm_(stacked, 1.0, torch.ones(3))
