"""The hard-vote reduction ("vote"): the one-hot of the class that most members predict.

It runs on the torch backend only: "auto" takes it there whatever the device, an explicitly named kernel backend
raises with every backend's reason. It keeps the reductions' contract (shape, dtype, any strides, the non-finite
rule) and is not differentiable: its result never requires grad.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fused_ensemble import REDUCTIONS, FusedEnsemble, ensemble_linear_reduce, ensemble_reduce
from fused_ensemble.ops import dispatch, library
from fused_ensemble.ops.reference import reduce_reference


def _one_hot(classes, num_classes, dtype=torch.float32):
    return torch.nn.functional.one_hot(torch.tensor(classes), num_classes).to(dtype)


def test_vote_is_a_reduction_and_the_unknown_reduction_error_lists_every_name():
    assert "vote" in REDUCTIONS
    with pytest.raises(ValueError) as error:
        ensemble_reduce(torch.randn(3, 4, 5), "hard_vote")
    assert all(repr(name) in str(error.value) for name in REDUCTIONS)


def test_the_most_frequent_member_argmax_wins():
    # Row 0: members vote 2, 0, 2, 1 -> 2. Row 1: 1, 1, 0, 0 -> a tie between 0 and 1: the lowest class, 0.
    # Row 2: member 0 ties classes 1 and 3 (its vote is the first, 1); members 1-3 vote 3, 1, 0 -> 1 (two votes).
    x = torch.full((4, 3, 4), -1.0)
    for member, (v0, v1, v2) in enumerate([(2, 1, 1), (0, 1, 3), (2, 0, 1), (1, 0, 0)]):
        x[member, 0, v0] = x[member, 1, v1] = x[member, 2, v2] = 1.0
    x[0, 2, 3] = 1.0
    out = ensemble_reduce(x, "vote")
    assert out.dtype == torch.float32 and out.shape == (3, 4)
    assert torch.equal(out, _one_hot([2, 0, 1], 4))
    assert torch.equal(out, reduce_reference(x.double(), "vote").float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_shape_dtype_and_member_dim_follow_the_reductions_contract(dtype):
    x = torch.randn(2, 5, 3, 7).to(dtype)  # [B1, N, B2, K], member dim 1
    out = ensemble_reduce(x, "vote", dim=1)
    assert out.shape == (2, 3, 7)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(out.sum(-1), torch.ones(2, 3, dtype=out.dtype))
    votes = torch.nn.functional.one_hot(x.float().argmax(-1), 7).sum(1)
    assert torch.equal(out.argmax(-1), votes.argmax(-1))
    assert torch.equal(ensemble_reduce(x, "vote", dim=-3), out)


def test_any_strides_and_empty_batch():
    base = torch.randn(6, 4, 90)
    for x in (base[..., ::2], base.transpose(0, 1), base[:1].expand(5, 4, 90)):
        assert torch.equal(ensemble_reduce(x, "vote"), reduce_reference(x.contiguous(), "vote"))
    assert ensemble_reduce(base[:, :0], "vote").shape == (0, 90)
    shared = ensemble_reduce(base[:1].expand(5, 4, 90), "vote")  # identical members: their common argmax
    assert torch.equal(shared, _one_hot(base[0].argmax(-1).tolist(), 90))


def test_non_finite_logits_follow_the_reductions_rule():
    x = torch.randn(3, 6, 5)
    x[1, 1, 2] = math.nan
    x[0, 2, 4] = math.inf
    x[2, 3, :] = -math.inf
    x[1, 4, :4] = -math.inf  # -inf entries alone: that member votes for class 4
    out = ensemble_reduce(x, "vote")
    undefined = torch.tensor([False, True, True, True, False, False])
    assert torch.equal(out.isnan().all(-1), undefined) and not out[~undefined].isnan().any()
    torch.testing.assert_close(out, reduce_reference(x.double(), "vote").float(), equal_nan=True, rtol=0, atol=0)


def test_not_differentiable_the_result_never_requires_grad():
    x = torch.randn(3, 4, 5, requires_grad=True)
    out = ensemble_reduce(x, "vote")
    assert not out.requires_grad
    loss = (out * ensemble_reduce(x, "mean_probs")).sum()  # the vote is a constant of this loss
    (grad,) = torch.autograd.grad(loss, x)
    (expected,) = torch.autograd.grad((out * ensemble_reduce(x, "mean_probs", backend="torch")).sum(), x)
    torch.testing.assert_close(grad, expected)


def test_auto_runs_it_on_torch_and_never_asks_a_kernel(monkeypatch):
    def no_kernels(backend):
        raise AssertionError(f"the {backend} kernels were asked for a vote")

    assert dispatch.resolve_backend("auto", "cpu", torch.float32, "reduce", "vote") == "torch"
    assert dispatch.resolve_backend("auto", "cuda", torch.float32, "reduce", "vote", 10, 64) == "torch"
    monkeypatch.setattr(library, "kernels", no_kernels)
    monkeypatch.setattr(dispatch, "_failed_under_auto", set())
    x = torch.randn(4, 3, 10)
    assert torch.equal(ensemble_reduce(x, "vote"), reduce_reference(x, "vote"))
    assert not dispatch._failed_under_auto


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_an_explicit_kernel_backend_raises_with_every_reason(backend):
    with pytest.raises(RuntimeError) as error:
        ensemble_reduce(torch.randn(3, 4, 5), "vote", backend=backend)
    message = str(error.value)
    assert f"backend={backend!r} is unavailable" in message
    assert "do not implement reduction 'vote'" in message and "torch: can run it" in message


def test_the_fused_head_votes_through_the_gemm_path():
    x, weight, bias = torch.randn(6, 8), torch.randn(3, 5, 8), torch.randn(3, 5)
    logits = torch.stack([x @ w.T + b for w, b in zip(weight, bias)])
    assert torch.equal(ensemble_linear_reduce(x, weight, bias, "vote"), reduce_reference(logits, "vote"))
    with pytest.raises(RuntimeError, match="do not implement reduction 'vote'"):
        ensemble_linear_reduce(x, weight, bias, "vote", backend="triton")


def test_fused_ensemble_votes():
    torch.manual_seed(1)
    members = [nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4)).eval() for _ in range(5)]
    x = torch.randn(9, 6)
    fused = FusedEnsemble(members, reduction="vote")
    with torch.no_grad():
        expected = reduce_reference(torch.stack([m(x) for m in members]), "vote")
    out = fused(x)
    assert out.shape == (9, 4) and not out.requires_grad
    assert torch.equal(out, expected)
