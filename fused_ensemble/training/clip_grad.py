"""Gradient clipping per member: each member's gradients are clipped by that member's own norm.

``torch.nn.utils.clip_grad_norm_(fused.parameters(), max_norm)`` computes ONE norm over the stacked gradients of
all members and scales every member by it: a member with large gradients then shrinks the steps of all the
others, and the members stop being independent trainings. These functions keep dim 0 of every parameter as the
member index (as ``fused_ensemble.optim`` does), so member i is clipped exactly as
``torch.nn.utils.clip_grad_norm_(member_i.parameters(), max_norm_i)`` would clip it alone::

    loss.backward()
    norms = clip_grad_norm_(fused.parameters(), max_norm=1.0)   # [N]: each member's norm before clipping
    opt.step()

``torch.nn.utils.clip_grad_value_`` needs no counterpart: it clamps element by element, so it never mixes members.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fused_ensemble.training.member_values import MemberValue, check_range, member_view, per_member

__all__ = ["clip_grad_norm_", "clip_grads_with_norm_", "member_grad_norms"]


def _grads(parameters: Iterable[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    return [p.grad for p in parameters if p.grad is not None]


def _num_members(grads: list[torch.Tensor]) -> int:
    sizes = {g.shape[0] if g.dim() else None for g in grads}
    if None in sizes or len(sizes) != 1:
        shapes = sorted({tuple(g.shape) for g in grads})
        raise ValueError("every gradient must have the member index as dim 0, with the same number of members; "
                         f"got gradients of shapes {shapes}")
    return sizes.pop()


def member_grad_norms(parameters: Iterable[torch.Tensor] | torch.Tensor, norm_type: float = 2.0,
                      error_if_nonfinite: bool = False) -> torch.Tensor:
    """The norm of each member's gradients, over all of ``parameters`` as if they were one vector: ``[N]``.

    Member i's value is ``torch.nn.utils.get_total_norm`` of member i's gradients alone (the norm of its
    per-parameter norms), in the gradients' dtype, on the first gradient's device. ``norm_type`` may be ``inf``.
    With ``error_if_nonfinite``, a NaN or infinite norm raises, naming the members. No gradients: an empty tensor.
    """
    grads = _grads(parameters)
    if not grads:
        return torch.zeros(0)
    num_members = _num_members(grads)
    norm_type = float(norm_type)
    device = grads[0].device
    per_parameter = []
    for g in grads:
        # The member dim stays, every other dim is reduced; a [N] parameter is N one-element vectors.
        flat = g.unsqueeze(1) if g.dim() == 1 else g
        per_parameter.append(torch.linalg.vector_norm(flat, norm_type, dim=tuple(range(1, flat.dim()))).to(device))
    norms = torch.linalg.vector_norm(torch.stack(per_parameter), norm_type, dim=0)
    if error_if_nonfinite:
        bad = (~torch.isfinite(norms)).nonzero().flatten().tolist()
        if bad:
            raise RuntimeError(f"the gradient norm of member(s) {bad} of {num_members} is non-finite "
                               f"({norms[bad].tolist()}); clipping would spread it. Set error_if_nonfinite=False "
                               "to clip anyway, or freeze those members (optimizer.freeze(i))")
    return norms


@torch.no_grad()
def clip_grads_with_norm_(parameters: Iterable[torch.Tensor] | torch.Tensor, max_norm: MemberValue,
                          member_norms: torch.Tensor) -> None:
    """Scales each member's gradients by ``min(1, max_norm_i / (norm_i + 1e-6))``, as
    ``torch.nn.utils.clip_grads_with_norm_`` does for one model. ``member_norms``: ``[N]``, e.g. from
    ``member_grad_norms``; ``max_norm``: a number or one per member."""
    grads = _grads(parameters)
    if not grads:
        return
    num_members = _num_members(grads)
    if member_norms.shape != (num_members,):
        raise ValueError(f"member_norms must have shape ({num_members},) (one norm per member), "
                         f"got {tuple(member_norms.shape)}")
    limits = per_member(max_norm, "max_norm", num_members)
    check_range(limits, "max_norm", 0.0)
    limits = torch.tensor(limits, dtype=member_norms.dtype, device=member_norms.device)
    # As torch: max_norm / (norm + 1e-6), computed as its reciprocal times max_norm, clamped at 1 (a member below
    # its limit is multiplied by exactly 1).
    coefficients = torch.clamp((member_norms + 1e-6).reciprocal() * limits, max=1.0)
    for g in grads:
        g.mul_(member_view(coefficients, g))


def clip_grad_norm_(parameters: Iterable[torch.Tensor] | torch.Tensor, max_norm: MemberValue,
                    norm_type: float = 2.0, error_if_nonfinite: bool = False) -> torch.Tensor:
    """Clips each member's gradients (in place) to norm ``max_norm`` (a number, or one per member); returns the
    members' norms before clipping, ``[N]``. Member i ends as ``torch.nn.utils.clip_grad_norm_`` leaves member i
    trained alone; see the module doc."""
    if not isinstance(parameters, torch.Tensor):
        parameters = list(parameters)  # read twice: a generator such as fused.parameters() would be spent
    norms = member_grad_norms(parameters, norm_type, error_if_nonfinite)
    if norms.numel():
        clip_grads_with_norm_(parameters, max_norm, norms)
    return norms
