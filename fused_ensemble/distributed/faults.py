"""Failing together: an exception on one rank stops every rank, with an error that names it, in bounded time.

Without this, a rank that raises leaves the others waiting: in the next collective (until the group's timeout), or,
where they exchange nothing (members trained without a data dimension), training on to the end. ``FailTogether``
checks at step boundaries: every rank all-reduces a flag over a gloo group of its own (a CPU side channel, also with
NCCL training groups), and when some rank raised, every other one raises ``PeerFailure`` naming it and its error.

A rank that fails inside a collective (a step's gradient all-reduce) leaves its peers in that collective: they leave
it when the group's timeout expires (or at once where gloo sees the failed process's connections close), then meet at
the flag all-reduce. So the time to fail is bounded by the training groups' timeout (set it with
``torch.distributed.init_process_group(timeout=...)`` and ``member_mesh(timeout=...)``) plus one step; the side
channel's own ``timeout`` must be longer than both.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from fused_ensemble.distributed.collectives import all_reduce

__all__ = ["PeerFailure", "FailTogether"]

_MESSAGE_BYTES = 512


class PeerFailure(RuntimeError):
    """Raised when other ranks of the group failed: ``ranks`` are the ones that failed (empty when they could not be
    reached) and ``messages`` their errors (``"TypeName: message"``, cut to 500 bytes)."""

    def __init__(self, where: str, ranks: list[int], messages: list[str], unreachable: str | None = None):
        self.ranks = ranks
        self.messages = messages
        if unreachable is not None:
            text = f"{where}: the other ranks could not be reached ({unreachable}); this rank stops too"
        else:
            details = "; ".join(f"rank {rank}: {message}" for rank, message in zip(ranks, messages))
            text = f"{where}: rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} failed ({details})"
        super().__init__(text)


class FailTogether:
    """A side channel over every process of the default group that makes all of them fail when one does.

    Use it as a context manager around each step (every rank enters and leaves it the same number of times)::

        guard = FailTogether()
        for step in steps:
            with guard:
                train_step(...)

    Leaving the block all-reduces one flag per rank over the side channel. A rank whose block raised tells the others
    and re-raises its own error (or raises ``PeerFailure`` chained to it, when other ranks failed too: a rank that
    timed out waiting for a failed one learns which one it waited for); the ranks that did not fail raise
    ``PeerFailure``. ``check(error)`` does the same by hand.
    Creating it is collective (``torch.distributed.new_group``). ``timeout``: how long the side channel waits for
    the slowest rank to reach a step boundary.
    """

    def __init__(self, timeout: timedelta = timedelta(minutes=30)):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("FailTogether needs an initialized default process group")
        self.group = dist.new_group(backend="gloo", timeout=timeout)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.steps = 0

    def check(self, error: BaseException | None = None, where: str | None = None) -> None:
        """Tells every rank whether this one failed (``error``) and raises ``PeerFailure`` if another did (see the
        class doc). Every rank must call it the same number of times."""
        where = where or f"step boundary {self.steps}"
        self.steps += 1
        flags = torch.zeros(self.world_size, dtype=torch.int32)
        flags[self.rank] = error is not None
        try:
            all_reduce(flags, "sum", self.group)
        except RuntimeError as unreachable:
            if error is not None:
                return  # the rank's own error says more than the side channel's
            raise PeerFailure(where, [], [], unreachable=str(unreachable).splitlines()[0]) from None
        if not flags.any():
            return
        messages = torch.zeros(self.world_size, _MESSAGE_BYTES, dtype=torch.uint8)
        if error is not None:
            text = f"{type(error).__name__}: {error}".encode()[:_MESSAGE_BYTES - 12]
            messages[self.rank, :len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        all_reduce(messages, "sum", self.group)
        failed = flags.nonzero().flatten().tolist()
        if failed == [self.rank]:
            return
        texts = [bytes(messages[rank].tolist()).rstrip(b"\0").decode(errors="replace") for rank in failed]
        raise PeerFailure(where, failed, texts) from error

    def __enter__(self) -> FailTogether:
        return self

    def __exit__(self, exc_type, exc, traceback) -> bool:
        if exc is not None and not isinstance(exc, Exception):
            return False  # KeyboardInterrupt, SystemExit: leave at once
        if isinstance(exc, PeerFailure):
            return False
        self.check(exc)
        return False  # this rank's own error, if any, propagates
