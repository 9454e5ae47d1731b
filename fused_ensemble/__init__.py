"""fused_ensemble: run and train N networks of one architecture as one fused network.

``FusedEnsemble`` rewrites N members into one network (grouped convolutions, batched matmuls, stacked
normalization); ``ensemble_reduce`` / ``ensemble_stats`` reduce the member outputs in one fused pass.
"""

from fused_ensemble.ensemble_reduce import ensemble_reduce, ensemble_stats
from fused_ensemble.fused import FusedEnsemble
from fused_ensemble.reference import REDUCTIONS, EnsembleStats

__all__ = ["FusedEnsemble", "REDUCTIONS", "EnsembleStats", "ensemble_reduce", "ensemble_stats"]
__version__ = "0.1.0"
