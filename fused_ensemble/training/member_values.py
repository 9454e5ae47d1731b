"""Per-member hyperparameter values: one number for every member, or one number per member."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

MemberValue = float | int | Sequence[float] | torch.Tensor
"""A hyperparameter that is either shared by all members (a number) or given per member (length-N sequence)."""


def per_member(value: MemberValue, name: str, num_members: int, cast: Callable = float) -> list:
    """Expands ``value`` to a list of ``num_members`` numbers (each passed through ``cast``).

    A plain number is repeated for every member; a sequence or 1-D tensor must have exactly one entry per
    member. Anything else raises a ``TypeError``/``ValueError`` that names the hyperparameter.
    """
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return [cast(value.item())] * num_members
        if value.dim() != 1:
            raise ValueError(f"{name} must be a number or a 1-D sequence with one value per member, "
                             f"got a tensor of shape {tuple(value.shape)}")
        value = value.tolist()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [cast(value)] * num_members
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a number or a sequence with one value per member, "
                        f"got {type(value).__name__}")
    if len(value) != num_members:
        raise ValueError(f"{name} has {len(value)} values, but the ensemble has {num_members} members "
                         f"(give one value per member, or one number for all)")
    values = []
    for member, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name}[{member}] must be a number, got {type(v).__name__}")
        values.append(cast(v))
    return values


def check_range(values: list, name: str, low: float, high: float = float("inf"),
                low_inclusive: bool = True, high_inclusive: bool = True) -> None:
    """Raises a ``ValueError`` naming the member whose value of ``name`` lies outside [low, high]."""
    for member, v in enumerate(values):
        ok_low = v >= low if low_inclusive else v > low
        ok_high = v <= high if high_inclusive else v < high
        if not (ok_low and ok_high):
            lo, hi = "[" if low_inclusive else "(", "]" if high_inclusive else ")"
            raise ValueError(f"member {member}: {name}={v} is outside {lo}{low}, {high}{hi}")


def member_view(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` (``[N]``, one entry per member) as ``[N, 1, ..., 1]`` on ``like``'s device: it broadcasts over
    the member slices of ``like`` (``[N, ...]``). The dtype stays: in-place ops compute in the wider one."""
    return value.to(like.device).view(-1, *([1] * (like.dim() - 1)))
