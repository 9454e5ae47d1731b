"""Members sharded over processes: one ensemble whose members live on several ranks (``torch.distributed``).

``ShardedEnsemble`` builds and runs each rank's contiguous block of members as one ``FusedEnsemble`` and combines the
ensemble's reductions from per-rank statistics of the result's size (``partial``), never gathering member logits;
``member_mesh`` makes its mesh (a ``"member"`` dimension, optionally a ``"data"`` one). ``train_epoch`` and
``evaluate`` are ``fused_ensemble.train_epoch`` and ``fused_ensemble.evaluate`` for it, ``save`` and ``load``
checkpoint it through ``torch.distributed.checkpoint`` (readable by any layout of ranks, or one plain process),
``FailTogether`` makes every rank fail when one does, and ``CollectiveLog`` counts the bytes the collectives send.
See the "Scaling out" guide.
"""

from fused_ensemble.distributed.checkpoint import load, load_extra, load_state, read_metadata, save
from fused_ensemble.distributed.collectives import CollectiveLog, CollectiveRecord
from fused_ensemble.distributed.evaluation import evaluate
from fused_ensemble.distributed.faults import FailTogether, PeerFailure
from fused_ensemble.distributed.mesh import member_blocks, member_mesh
from fused_ensemble.distributed.sharded import ShardedEnsemble
from fused_ensemble.distributed.training import average_gradients, member_batches, train_epoch

__all__ = [
    "CollectiveLog",
    "CollectiveRecord",
    "FailTogether",
    "PeerFailure",
    "ShardedEnsemble",
    "average_gradients",
    "evaluate",
    "load",
    "load_extra",
    "load_state",
    "member_batches",
    "member_blocks",
    "member_mesh",
    "read_metadata",
    "save",
    "train_epoch",
]
