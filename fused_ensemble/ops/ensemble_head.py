"""The fused ensemble head: the members' final Linear layers and the ensemble reduction as one operation.

``ensemble_linear_reduce`` computes ``reduce(x[n] @ weight[n].T + bias[n] for n in members)``. On the triton
backend (``fused_ensemble.kernels.ensemble_head``) the [N, B, K] member logits never reach memory; the others
compute them with one GEMM and reduce them with ``ensemble_reduce`` on the same backend.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from fused_ensemble.ops import dispatch
from fused_ensemble.ops.ensemble_reduce import ensemble_reduce
from fused_ensemble.ops.reductions import check_float_tensor, check_reduction
from fused_ensemble.ops.reference import member_logits

__all__ = ["ensemble_linear_reduce"]


def _check_inputs(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    named = (("weight", weight), ("x", x), ("bias", bias))  # weight first: the others are compared to it
    for name, t in named:
        if t is None and name == "bias":
            continue
        check_float_tensor(t, name)
        if t.dtype != weight.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but weight has {weight.dtype}; all inputs must share one "
                            f"dtype")
        if t.device != weight.device:
            raise ValueError(f"{name} is on {t.device} but weight is on {weight.device}")
    if weight.dim() != 3:
        raise ValueError(f"weight must have shape [N, K, F] (members, classes, features), got shape "
                         f"{tuple(weight.shape)}")
    N, K, F = weight.shape
    if N == 0 or K == 0:
        raise ValueError(f"weight must have at least one member and one class, got shape {tuple(weight.shape)}")
    if x.dim() == 2:
        if x.shape[1] != F:
            raise ValueError(f"x must have shape [B, F={F}] (weight has {F} features), got {tuple(x.shape)}")
    elif x.dim() == 3:
        if x.shape[0] != N or x.shape[2] != F:
            raise ValueError(f"x must have shape [B, F={F}] or [N={N}, B, F={F}] (weight is {tuple(weight.shape)}), "
                             f"got {tuple(x.shape)}")
    else:
        raise ValueError(f"x must have shape [B, F] (shared by every member) or [N, B, F] (member i gets x[i]), "
                         f"got shape {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (N, K):
        raise ValueError(f"bias must have shape [N, K] = {(N, K)} or be None, got {tuple(bias.shape)}")


def _fused_kernel(x: Tensor, weight: Tensor, bias: Tensor | None, reduction: str) -> Tensor:
    members, _, features = weight.shape
    members_x = x.unsqueeze(0).expand(members, x.shape[0], features) if x.dim() == 2 else x  # stride 0: no copy
    return importlib.import_module("fused_ensemble.kernels.ensemble_head").head_forward(members_x, weight, bias,
                                                                                        reduction)


def ensemble_linear_reduce(x: Tensor, weight: Tensor, bias: Tensor | None = None, reduction: str = "mean_probs",
                           backend: str = "auto") -> Tensor:
    """Runs the N members' final Linear layers and reduces their logits over the members, in one fused operation.

    Computes ``reduce(z)`` with member logits ``z[n] = x[n] @ weight[n].T + bias[n]`` and ``reduce`` one of the
    reductions of :func:`~fused_ensemble.ensemble_reduce` over the member dim. With ``backend="triton"`` the
    [N, B, K] logits never reach memory: each output tile recomputes its members' logits tiles in registers.

    Args:
        x: features, ``[B, F]`` (every member sees the same features) or ``[N, B, F]`` (member n gets ``x[n]``).
            Any strides (expanded and non-contiguous views are read in place by the Triton kernels).
        weight: ``[N, K, F]``, the members' Linear weights stacked (``torch.stack([m.weight for m in heads])``).
        bias: ``[N, K]`` or None.
        reduction: ``"mean"`` (mean logits), ``"mean_probs"`` (mean of member softmaxes), ``"softmax_of_mean"``
            (softmax of the mean logits) or ``"log_mean_probs"`` (log of ``"mean_probs"``, computed stably).
        backend: ``"triton"``: the fused kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``;
            inference only); ``"cpp"`` / ``"torch"``: one GEMM (``addmm``/``baddbmm``) storing the logits, then
            :func:`~fused_ensemble.ensemble_reduce` with that backend (differentiable); ``"auto"``: triton for CUDA
            tensors when it can run and no input requires grad, else GEMM + ``ensemble_reduce(backend="auto")``.
            If the Triton kernels raise under ``"auto"``, a warning is issued and they are not used again.

    All inputs share one dtype: float32, float16 or bfloat16 (float64 with ``backend="torch"`` or ``"cpp"``).
    Products are accumulated in float32 (float32 inputs use TF32 in the Triton kernels only if
    ``torch.backends.cuda.matmul.allow_tf32`` is set, as for torch matmuls).

    Returns:
        float32 tensor ``[B, K]`` (float64 for float64 inputs).

    The Triton backend has no backward: it raises if an input requires grad while grad mode is on (``"auto"``
    then takes the GEMM path). For ``"mean_probs"`` and ``"log_mean_probs"`` with more classes than one tile
    holds, it computes the GEMM twice (once for each member row's log-sum-exp, once for the probabilities): the
    price of never storing the logits.

    Raises:
        TypeError: an input is not a tensor, has an integer (or otherwise non-float) dtype, or the dtypes differ.
        ValueError: a shape does not match (the message names the tensor and the expected shape), inputs on
            different devices, unknown ``reduction`` or ``backend``.
        RuntimeError: an explicitly named backend cannot run this input (the message gives every backend's
            reason), for instance triton with an input that requires grad.

    Example::

        >>> heads = [torch.nn.Linear(512, 10) for _ in range(8)]
        >>> weight = torch.stack([h.weight for h in heads]).detach()   # [8, 10, 512]
        >>> bias = torch.stack([h.bias for h in heads]).detach()       # [8, 10]
        >>> probs = ensemble_linear_reduce(torch.randn(64, 512), weight, bias, "mean_probs")  # [64, 10]
    """
    check_reduction(reduction)
    dispatch.check_backend(backend)
    _check_inputs(x, weight, bias)
    requires_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))

    def run_backend(chosen: str) -> Tensor:
        if chosen == "triton":
            return _fused_kernel(x, weight, bias, reduction)
        logits, member_dim = member_logits(x, weight, bias)
        # What "auto" chose only says the fused kernel cannot run: the reduction makes its own choice.
        return ensemble_reduce(logits, reduction, dim=member_dim, backend="auto" if backend == "auto" else chosen)

    return dispatch.run(backend, "linear_reduce", x, run_backend, reduction=reduction, classes=weight.shape[1],
                        rows=x.shape[-2], requires_grad=requires_grad)
