"""The collectives a sharded ensemble runs, in one place, each recorded in the active ``CollectiveLog``s.

Everything the sharded forward, the statistics, gradient averaging and evaluation send between ranks goes through
``all_reduce`` and ``all_gather`` here, so a ``CollectiveLog`` counts what the code actually sends: the payload of
each call (the tensor a rank contributes) and, by the ring algorithms' count that NCCL's bus bandwidth figures use,
the bytes a rank sends for it: ``2 (W - 1) / W`` times the payload for an all-reduce over W ranks, ``W - 1`` times it
for an all-gather. A collective over one rank sends nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["CollectiveLog", "CollectiveRecord", "all_reduce", "all_gather"]

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
_active_logs: list[CollectiveLog] = []


@dataclass(frozen=True)
class CollectiveRecord:
    """One collective call: ``kind`` (``"all_reduce"`` or ``"all_gather"``), the ranks of its group, and the bytes
    of the tensor this rank contributed."""

    kind: str
    ranks: int
    payload_bytes: int

    @property
    def sent_bytes(self) -> float:
        """Bytes this rank sends for the call under the ring algorithms (see the module doc)."""
        if self.ranks == 1:
            return 0.0
        if self.kind == "all_reduce":
            return 2 * (self.ranks - 1) / self.ranks * self.payload_bytes
        return (self.ranks - 1) * self.payload_bytes


@dataclass
class CollectiveLog:
    """Records every collective of this module run inside ``with CollectiveLog() as log:``."""

    records: list[CollectiveRecord] = field(default_factory=list)

    @property
    def payload_bytes(self) -> int:
        return sum(record.payload_bytes for record in self.records)

    @property
    def sent_bytes(self) -> float:
        return sum(record.sent_bytes for record in self.records)

    def __enter__(self) -> CollectiveLog:
        _active_logs.append(self)
        return self

    def __exit__(self, *exc_info) -> None:
        _active_logs.remove(self)


def _record(kind: str, tensor: torch.Tensor, group) -> None:
    record = CollectiveRecord(kind, dist.get_world_size(group), tensor.numel() * tensor.element_size())
    for log in _active_logs:
        log.records.append(record)


def all_reduce(tensor: torch.Tensor, op: str, group) -> torch.Tensor:
    """``tensor`` reduced in place over ``group`` with ``op`` (``"sum"`` or ``"max"``); returns it."""
    _record("all_reduce", tensor, group)
    dist.all_reduce(tensor, op=_REDUCE_OPS[op], group=group)
    return tensor


def all_gather(tensor: torch.Tensor, group) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (all of one shape and dtype), in the group's rank order."""
    _record("all_gather", tensor, group)
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, tensor.contiguous(), group=group)
    return gathered
