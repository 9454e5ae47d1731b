"""Helpers for the FusedEnsemble tests: members with random weights and randomized normalization state, the
member-loop oracle, and the fp32 comparison used by every test.

Fresh ``nn`` initializations leave many tensors constant (BatchNorm weight 1 and bias 0, running mean 0 and var 1,
zero biases in torchvision models): a fused network that mixed up members or ignored a tensor would still match
on those. ``randomize_`` replaces every constant tensor with random values, so such mistakes show.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from fused_ensemble.cli.workloads import randomize_state as randomize_

REL_TOL = 1e-5
"""Relative error allowed between the fused network and the member loop in fp32: ``|out - ref| / |ref|``."""


def make_members(factory: Callable[[], nn.Module], n: int = 2, seed: int = 0, training: bool = False
                 ) -> list[nn.Module]:
    """``n`` members built by ``factory`` with different seeds, randomized (see ``randomize_``), in the given mode."""
    members = []
    for index in range(n):
        torch.manual_seed(1000 * seed + index)
        generator = torch.Generator().manual_seed(7919 * seed + index)
        members.append(randomize_(factory(), generator).train(training))
    return members


def member_loop(members: Sequence[nn.Module], x: torch.Tensor, member_inputs: bool = False) -> torch.Tensor:
    """The oracle: every member run on its own, outputs stacked along a new dim 0."""
    return torch.stack([member(x[i] if member_inputs else x) for i, member in enumerate(members)])


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm())


def assert_matches(out: torch.Tensor, ref: torch.Tensor, rel: float = REL_TOL) -> None:
    """Fused output ``out`` equals the loop's ``ref`` to fp32 tolerance: relative error of the whole tensor
    ``<= rel`` and every element within ``rel`` relatively, or ``rel`` times the largest ``|ref|`` absolutely
    (elements near zero result from cancellation and carry the rounding error of their large terms)."""
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != loop's {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"dtype {out.dtype} != loop's {ref.dtype}"
    assert torch.isfinite(ref).all(), "the oracle itself is not finite: the test inputs are broken"
    assert ref.abs().max() > 0, "the oracle is all zeros: the test would prove nothing"
    error = relative_error(out, ref)
    assert error <= rel, f"relative error {error:.3g} > {rel:.0g}"
    torch.testing.assert_close(out, ref, rtol=rel, atol=rel * float(ref.detach().abs().max()))


def clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A deep copy of ``module.state_dict()`` (keys in order), to compare against later."""
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def assert_state_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Bit-for-bit equality of two state dicts: same keys in the same order, same dtypes, shapes and values."""
    assert list(actual) == list(expected)
    for name in expected:
        a, e = actual[name], expected[name]
        assert a.dtype == e.dtype and a.shape == e.shape, f"{name}: {a.dtype}{tuple(a.shape)} != " \
                                                          f"{e.dtype}{tuple(e.shape)}"
        assert torch.equal(a, e), f"{name} differs (max |diff| {(a.double() - e.double()).abs().max():.3g})"


def assert_grads_match(fused, members, rel: float = REL_TOL) -> None:
    """Every member's parameter gradients (after a backward through the loop) equal the matching slice of the
    fused module's stacked gradients."""
    stacked = dict(fused.stacked.named_parameters())
    # A gradient that is zero in exact arithmetic (a bias before a normalization) is rounding noise in both
    # runs: its absolute tolerance follows the member's largest gradient, not its own.
    scales = [max(float(p.grad.abs().max()) for p in member.parameters() if p.grad is not None)
              if any(p.grad is not None for p in member.parameters()) else 0.0 for member in members]
    checked = 0
    for name, _ in members[0].named_parameters():
        fused_grad = stacked[name].grad
        for index, member in enumerate(members):
            expected = member.get_parameter(name).grad
            if expected is None:
                assert fused_grad is None or not fused_grad[index].any(), f"member {index}: {name} got a gradient"
                continue
            assert fused_grad is not None, f"{name}: no gradient in the fused module"
            actual = fused_grad[index]
            torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scales[index],
                                       msg=lambda m: f"member {index}: {name}.grad: {m}")
            checked += 1
    assert checked, "no parameter received a gradient: the test proves nothing"
