"""Per-member batch streams for training with ``member_inputs=True``: each member draws its own shuffle (or
bootstrap resample) of the training set, and step t yields every member's t-th batch stacked as ``[N, B, ...]``."""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["SAMPLINGS", "member_batches", "member_index_batches"]

SAMPLINGS = ("shuffle", "bootstrap")


def member_index_batches(num_examples: int, num_members: int, batch_size: int, sampling: str = "shuffle",
                         generator: torch.Generator | None = None, drop_last: bool = True) -> Iterator[torch.Tensor]:
    """One epoch of per-member example indices, as ``[N, B]`` int64 tensors.

    ``sampling="shuffle"``: every member sees every example once, in its own random order.
    ``sampling="bootstrap"``: every member draws ``num_examples`` examples with replacement (bagging).
    All members' orders are drawn at once from ``generator`` (reproducible with a seeded generator).
    ``drop_last``: skip the final partial batch (it could hold one example, which BatchNorm cannot train on).
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"unknown sampling {sampling!r}; expected one of {', '.join(map(repr, SAMPLINGS))}")
    if batch_size < 1 or num_members < 1 or num_examples < 1:
        raise ValueError(f"need num_examples, num_members and batch_size >= 1, got {num_examples}, "
                         f"{num_members}, {batch_size}")
    if drop_last and num_examples < batch_size:
        raise ValueError(f"batch_size={batch_size} is larger than the {num_examples} examples (drop_last=True "
                         f"would leave no batch)")
    if sampling == "shuffle":
        order = torch.rand(num_members, num_examples, generator=generator).argsort(dim=1)
    else:
        order = torch.randint(num_examples, (num_members, num_examples), generator=generator)
    stop = num_examples - num_examples % batch_size if drop_last else num_examples
    for start in range(0, stop, batch_size):
        yield order[:, start:start + batch_size]


def member_batches(x: torch.Tensor, y: torch.Tensor, num_members: int, batch_size: int, sampling: str = "shuffle",
                   generator: torch.Generator | None = None,
                   drop_last: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of ``(x [N, B, ...], y [N, B])`` batches for ``FusedEnsemble(..., member_inputs=True)``:
    member i's batch is ``x[indices[i]]`` (see ``member_index_batches``)."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]}")
    for indices in member_index_batches(x.shape[0], num_members, batch_size, sampling, generator, drop_last):
        yield x[indices], y[indices]
