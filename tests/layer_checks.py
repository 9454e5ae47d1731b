"""Checks of one layer kind in a FusedEnsemble against the member loop (outputs and parameter gradients), with a
shared input and with member inputs: what the tests of every rule and generic path use."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from fused_ensemble import FusedEnsemble

from member_factories import assert_grads_match, assert_matches, make_members, member_loop

N, BATCH = 2, 3


def draw_input(sample_shape, member_inputs: bool, n: int = N, batch: int = BATCH) -> torch.Tensor:
    return torch.randn(((n,) if member_inputs else ()) + (batch, *sample_shape))


def check_outputs_and_grads(factory: Callable[[], nn.Module], sample_shape, training: bool, seed: int,
                            n: int = 3) -> None:
    """As ``check_layer`` for members that return a tuple of tensors: each output against the member loop's, then
    every parameter gradient, in both input modes. An all-zero output of the loop is a placeholder (for attention
    weights not asked for): the fused module gives zeros or, where tracing kept the layer's None, None."""
    for member_inputs in (False, True):
        members = make_members(factory, n=n, seed=seed, training=training)
        x = draw_input(sample_shape, member_inputs, n=n)
        fused = FusedEnsemble(copy.deepcopy(members), reduction="none", member_inputs=member_inputs)
        outs = fused(x)
        refs = [torch.stack(parts) for parts in zip(*[m(x[i] if member_inputs else x) for i, m in enumerate(members)])]
        assert len(outs) == len(refs)
        for out, ref in zip(outs, refs):
            if ref.abs().max() > 0:
                assert_matches(out, ref)
            else:
                assert out is None or torch.equal(out, ref)
        weights = [torch.randn_like(ref) for ref in refs]
        sum((o * w).sum() for o, w in zip(outs, weights) if o is not None).backward()
        sum((r * w).sum() for r, w in zip(refs, weights)).backward()
        assert_grads_match(fused, members)


def check_layer(factory: Callable[[], nn.Module], sample_shape=None, *, draw=None, training: bool = False,
                n: int = N, modes=(False, True), grad: bool = True) -> None:
    """Fuses ``n`` members built by ``factory`` and checks, in each input mode of ``modes`` (False: shared input,
    True: member inputs), the output and every parameter gradient against the member loop.

    ``draw(member_inputs)`` makes the input instead of a random float tensor of ``sample_shape``.
    """
    for member_inputs in modes:
        members = make_members(factory, n=n, seed=1 + int(member_inputs), training=training)
        x = draw(member_inputs) if draw else draw_input(sample_shape, member_inputs, n)
        fused = FusedEnsemble(copy.deepcopy(members), reduction="none", member_inputs=member_inputs)
        out = fused(x)
        ref = member_loop(members, x, member_inputs)
        assert_matches(out, ref)
        if grad and any(p.requires_grad for p in members[0].parameters()):
            weights = torch.randn_like(ref)
            (out * weights).sum().backward()
            (ref * weights).sum().backward()
            assert_grads_match(fused, members)


def check_on_cuda(factory: Callable[[], nn.Module], sample_shape, seed: int, n: int = 3) -> None:
    """The fused members on CUDA (member inputs, no grad) against the member loop there; members may return a tuple
    of tensors."""
    members = [m.cuda() for m in make_members(factory, n=n, seed=seed)]
    fused = FusedEnsemble(copy.deepcopy(members), reduction="none", member_inputs=True).cuda()
    x = draw_input(sample_shape, True, n=n).cuda()
    with torch.no_grad():
        outs = fused(x)
        refs = [m(x[i]) for i, m in enumerate(members)]
    outs = outs if isinstance(outs, tuple) else (outs,)
    refs = [torch.stack(parts) for parts in zip(*[r if isinstance(r, tuple) else (r,) for r in refs])]
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
