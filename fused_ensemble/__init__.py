"""fused_ensemble: run and train N networks of one architecture as one fused network.

``FusedEnsemble`` rewrites N members into one network (grouped convolutions, batched matmuls, stacked
normalization), and ``shared()`` marks an input that every member sees whole when the others are per member;
``optimize()`` tunes it for inference (``OptimizedEnsemble``); ``ensemble_reduce``, ``ensemble_stats`` and
``ensemble_linear_reduce`` reduce the member outputs in one fused pass; ``optim``, ``lr_scheduler``, ``clip_grad``
and ``amp`` train every member with its own hyperparameters.

Every name a user needs is exported here; the subpackages hold the parts: ``fusion`` (how members become one
network), ``inference`` (``optimize()``), ``ops`` (the ensemble ops and their backends), ``training``, and ``cli``
(the commands and the benchmark model zoo).
"""

import sys

from fused_ensemble.config import conv_backward
from fused_ensemble.fused import FusedEnsemble
from fused_ensemble.fusion.inputs import SharedInput, shared
from fused_ensemble.inference.optimized import OptimizedEnsemble
from fused_ensemble.ops.ensemble_head import ensemble_linear_reduce
from fused_ensemble.ops.ensemble_reduce import ensemble_reduce, ensemble_stats
from fused_ensemble.ops.reductions import REDUCTIONS, EnsembleStats
from fused_ensemble.training import amp, clip_grad, lr_scheduler, optim
from fused_ensemble.training.amp import MemberGradScaler
from fused_ensemble.training.batches import member_batches
from fused_ensemble.training.clip_grad import clip_grad_norm_
from fused_ensemble.training.loop import evaluate, member_cross_entropy, member_probabilities, train_epoch

__all__ = [
    "REDUCTIONS",
    "EnsembleStats",
    "FusedEnsemble",
    "MemberGradScaler",
    "OptimizedEnsemble",
    "SharedInput",
    "amp",
    "clip_grad",
    "clip_grad_norm_",
    "conv_backward",
    "ensemble_linear_reduce",
    "ensemble_reduce",
    "ensemble_stats",
    "evaluate",
    "lr_scheduler",
    "member_batches",
    "member_cross_entropy",
    "member_probabilities",
    "optim",
    "shared",
    "train_epoch",
]
__version__ = "0.1.0"

# The training modules keep the names they have always been imported by: `import fused_ensemble.optim` and
# `from fused_ensemble.optim import SGD` work as `from fused_ensemble import optim` does.
for _alias, _module in (("optim", optim), ("lr_scheduler", lr_scheduler), ("clip_grad", clip_grad), ("amp", amp)):
    sys.modules[f"{__name__}.{_alias}"] = _module
del _alias, _module
