"""The fused ensemble head: the members' final Linear layers and the ensemble reduction as one operation.

``ensemble_linear_reduce`` computes ``reduce(x[n] @ weight[n].T + bias[n] for n in members)``. The Triton backend
(fused_ensemble.kernels.ensemble_head) never stores the [N, B, K] member logits; the torch backend (the CPU path,
the test oracle and the benchmark baseline) computes them with one GEMM and reduces them with
``ensemble_reduce``.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch
from torch import Tensor

from fused_ensemble.backends import NOT_KERNEL_FAILURES
from fused_ensemble.ensemble_reduce import ensemble_reduce
from fused_ensemble.reference import check_float_tensor, check_reduction

__all__ = ["ensemble_linear_reduce", "HEAD_BACKENDS"]

HEAD_BACKENDS = ("auto", "torch", "triton")

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Why the Triton head kernels cannot be imported (None: they can); checked once.
_kernel_import_problem: list[str | None] = []
# Set when the Triton kernels raised under backend="auto": "auto" then uses torch for the rest of the process.
_triton_failed_under_auto = False


def _kernels():
    return importlib.import_module("fused_ensemble.kernels.ensemble_head")


def _triton_import_problem() -> str | None:
    if not _kernel_import_problem:
        try:
            _kernels()
            _kernel_import_problem.append(None)
        except Exception as exc:  # a missing or broken triton must not break the package
            _kernel_import_problem.append(f"the Triton head kernels failed to import: {type(exc).__name__}: {exc}")
    return _kernel_import_problem[0]


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


def _triton_unavailable_reason(x: Tensor) -> str | None:
    if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "the Triton kernels need CUDA tensors (or CPU tensors under TRITON_INTERPRET=1)"
    if x.device.type not in ("cpu", "cuda"):
        return f"the Triton kernels take CUDA tensors, got a {x.device.type} tensor"
    if x.dtype not in _TRITON_DTYPES:
        return f"the Triton kernels take float16, bfloat16 or float32 inputs, got {x.dtype}"
    return _triton_import_problem()


def _requires_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _torch_forward(x: Tensor, weight: Tensor, bias: Tensor | None, reduction: str) -> Tensor:
    # fp16/bf16 are upcast so that the logits are not rounded to 8 or 11 bits before the softmax.
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    x, weight = x.to(compute), weight.to(compute)
    bias = None if bias is None else bias.to(compute)
    N, K, F = weight.shape
    if x.dim() == 2:
        # A shared input: one dense [B, F] x [F, N*K] GEMM; the [B, N, K] view keeps the members in dim 1.
        flat_weight = weight.reshape(N * K, F).t()
        logits = x @ flat_weight if bias is None else torch.addmm(bias.reshape(N * K), x, flat_weight)
        return ensemble_reduce(logits.view(x.shape[0], N, K), reduction, dim=1)
    weight_t = weight.transpose(1, 2)
    logits = torch.bmm(x, weight_t) if bias is None else torch.baddbmm(bias.unsqueeze(1), x, weight_t)
    return ensemble_reduce(logits, reduction, dim=0)


def _triton_forward(x: Tensor, weight: Tensor, bias: Tensor | None, reduction: str) -> Tensor:
    N, _, F = weight.shape
    members_x = x.unsqueeze(0).expand(N, x.shape[0], F) if x.dim() == 2 else x  # member stride 0: no copy
    return _kernels().head_forward(members_x, weight, bias, reduction)


def ensemble_linear_reduce(x: Tensor, weight: Tensor, bias: Tensor | None = None, reduction: str = "mean_probs",
                           backend: str = "auto") -> Tensor:
    """Runs the N members' final Linear layers and reduces their logits over the members, in one fused operation.

    Computes ``reduce(z)`` with member logits ``z[n] = x[n] @ weight[n].T + bias[n]`` and ``reduce`` one of the
    reductions of ``fused_ensemble.reference`` over the member dim. With ``backend="triton"`` the [N, B, K]
    logits never reach memory: each output tile recomputes its members' logits tiles in registers.

    Args:
        x: features, ``[B, F]`` (every member sees the same features) or ``[N, B, F]`` (member n gets ``x[n]``).
            Any strides (expanded and non-contiguous views are read in place by the Triton kernels).
        weight: ``[N, K, F]``, the members' Linear weights stacked (``torch.stack([m.weight for m in heads])``).
        bias: ``[N, K]`` or None.
        reduction: ``"mean"`` (mean logits), ``"mean_probs"`` (mean of member softmaxes), ``"softmax_of_mean"``
            (softmax of the mean logits) or ``"log_mean_probs"`` (log of ``"mean_probs"``, computed stably).
        backend: ``"torch"``: one GEMM (``addmm``/``baddbmm``) storing the logits, then
            :func:`~fused_ensemble.ensemble_reduce` (the CPU path and the test oracle; differentiable);
            ``"triton"``: the fused kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``);
            ``"auto"``: triton for CUDA tensors when triton imports and no input requires grad, else torch. If
            the Triton kernels raise under ``"auto"``, a warning is issued and torch is used from then on.

    All inputs share one dtype: float32, float16 or bfloat16 (float64 with ``backend="torch"``). Products are
    accumulated in float32 (float32 inputs use TF32 in the Triton kernels only if
    ``torch.backends.cuda.matmul.allow_tf32`` is set, as for torch matmuls).

    Returns:
        float32 tensor ``[B, K]`` (float64 for float64 inputs).

    The Triton backend is inference only: it has no backward, and it raises if an input requires grad while
    grad mode is on (``"auto"`` then takes the differentiable torch path). For ``"mean_probs"`` and
    ``"log_mean_probs"`` with more classes than one tile holds, it computes the GEMM twice (once for each
    member row's log-sum-exp, once for the probabilities): the price of never storing the logits.

    Raises:
        TypeError: an input is not a tensor, has an integer (or otherwise non-float) dtype, or the dtypes differ.
        ValueError: a shape does not match (the message names the tensor and the expected shape), inputs on
            different devices, unknown ``reduction`` or ``backend``.
        RuntimeError: ``backend="triton"`` cannot run here (says why), or an input requires grad with it.

    Example::

        >>> heads = [torch.nn.Linear(512, 10) for _ in range(8)]
        >>> weight = torch.stack([h.weight for h in heads]).detach()   # [8, 10, 512]
        >>> bias = torch.stack([h.bias for h in heads]).detach()       # [8, 10]
        >>> probs = ensemble_linear_reduce(torch.randn(64, 512), weight, bias, "mean_probs")  # [64, 10]
    """
    global _triton_failed_under_auto
    check_reduction(reduction)
    if backend not in HEAD_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(map(repr, HEAD_BACKENDS))}")
    _check_inputs(x, weight, bias)
    if backend == "triton":
        problem = _triton_unavailable_reason(x)
        if problem is not None:
            raise RuntimeError(f"backend='triton' is unavailable: {problem}")
        if _requires_grad(x, weight, bias):
            raise RuntimeError("the Triton ensemble head is inference only (no backward) but an input requires "
                               "grad; use backend='torch' (or 'auto'), torch.no_grad(), or detached inputs")
        return _triton_forward(x, weight, bias, reduction)
    use_triton = (backend == "auto" and x.device.type == "cuda" and not _triton_failed_under_auto
                  and not _requires_grad(x, weight, bias) and _triton_unavailable_reason(x) is None)
    if use_triton:
        try:
            return _triton_forward(x, weight, bias, reduction)
        except NOT_KERNEL_FAILURES:
            raise
        except Exception as exc:
            _triton_failed_under_auto = True
            warnings.warn(f"fused_ensemble: the Triton ensemble-head kernels failed ({type(exc).__name__}: {exc});"
                          f" backend='auto' uses the torch path from now on", RuntimeWarning, stacklevel=2)
    return _torch_forward(x, weight, bias, reduction)
