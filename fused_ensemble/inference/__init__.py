"""``optimize()``: an inference-only ensemble tuned on an example input (``OptimizedEnsemble``), with BatchNorm
folded into convolutions (``batchnorm_folding``), convolutions laid out once and run grouped or per member
(``prepared_conv``), and every choice made by timing the candidates (``timing``)."""

from fused_ensemble.inference.optimized import OptimizedEnsemble

__all__ = ["OptimizedEnsemble"]
