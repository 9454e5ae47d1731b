"""torch.library registration of the ensemble-reduction kernels (namespace ``fused_ensemble``).

Three custom ops over logits ``x`` of shape [N, R, K] (members, rows, classes; any strides):

- ``fused_ensemble::reduce(Tensor x, str reduction, str backend) -> (Tensor out, Tensor aux)``
- ``fused_ensemble::reduce_backward(Tensor grad_out, Tensor x, Tensor out, Tensor aux, str reduction,
  str backend) -> Tensor``
- ``fused_ensemble::stats(Tensor x, str backend) -> (probs, entropy, expected_entropy, mutual_info, confidence,
  prediction, disagreement)``

``backend`` is ``"triton"`` (fused_ensemble.kernels.ensemble_reduce) or ``"cpp"`` (the ``fused_ensemble_ext`` ops of
the compiled extension, told ``config.settings.cuda_short_rows``). ``reduce`` and ``stats`` are what the public API
calls: the custom ops, or, where the custom op would only call its kernel (see ``_plain_eager_call``), the kernel
itself. Each op has a fake (meta) implementation, and ``reduce`` an autograd formula whose backward is the kernels'
own backward, so ``torch.compile(fullgraph=True)`` sees one opaque node per op and ``torch.library.opcheck`` passes.
The shapes and dtypes follow the kernel contract (fused_ensemble.ops.reductions, and the kernel modules' docstrings):
``reduce_forward(x, reduction) -> (out [R, K], aux)`` (``aux`` as ``reductions.aux_shape`` says),
``reduce_backward(grad_out, x, out, aux, reduction) -> grad`` and ``stats_forward(x) -> 7 tensors``.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor
from torch.utils import _python_dispatch

from fused_ensemble import config
from fused_ensemble.ops.reductions import MEMBER_INDEPENDENT_GRAD, aux_shape, compute_dtype


class _CppKernels:
    """The compiled extension's ops, with the switches of ``config.settings`` passed down."""

    @staticmethod
    def reduce_forward(x: Tensor, reduction: str):
        if x.is_cuda:
            return torch.ops.fused_ensemble_ext.reduce_forward(x, reduction, config.settings.cuda_short_rows)
        return torch.ops.fused_ensemble_ext.reduce_forward(x, reduction)

    @staticmethod
    def reduce_backward(grad_out: Tensor, x: Tensor, out: Tensor, aux: Tensor, reduction: str):
        return torch.ops.fused_ensemble_ext.reduce_backward(grad_out, x, out, aux, reduction)

    @staticmethod
    def stats_forward(x: Tensor):
        if x.is_cuda:
            return torch.ops.fused_ensemble_ext.stats_forward(x, config.settings.cuda_short_rows)
        return torch.ops.fused_ensemble_ext.stats_forward(x)


def kernels(backend: str):
    """What holds reduce_forward / reduce_backward / stats_forward for ``backend``."""
    if backend == "triton":
        return importlib.import_module("fused_ensemble.kernels.ensemble_reduce")
    if backend == "cpp":
        return _CppKernels
    raise ValueError(f"fused_ensemble ops run the 'triton' or 'cpp' kernels, got backend={backend!r}")


@torch.library.custom_op("fused_ensemble::reduce", mutates_args=())
def reduce_op(x: Tensor, reduction: str, backend: str) -> tuple[Tensor, Tensor]:
    """Reduces [N, R, K] logits over dim 0; returns (out [R, K], aux saved for the backward pass)."""
    out, aux = kernels(backend).reduce_forward(x, reduction)
    return out.contiguous(), aux.contiguous()


@reduce_op.register_fake
def _reduce_fake(x: Tensor, reduction: str, backend: str) -> tuple[Tensor, Tensor]:
    members, rows, classes = x.shape
    dtype = compute_dtype(x.dtype)
    out = x.new_empty((rows, classes), dtype=dtype)
    return out, x.new_empty(aux_shape(reduction, members, rows), dtype=dtype)


@torch.library.custom_op("fused_ensemble::reduce_backward", mutates_args=())
def reduce_backward_op(grad_out: Tensor, x: Tensor, out: Tensor, aux: Tensor, reduction: str,
                    backend: str) -> Tensor:
    """Gradient of ``reduce_op``: [R, K] (the same for every member) or [N, R, K] (see MEMBER_INDEPENDENT_GRAD)."""
    # The fake says "contiguous"; a kernel that returns another layout pays one copy here rather than breaking
    # the stride assertions of compiled graphs.
    return kernels(backend).reduce_backward(grad_out, x, out, aux, reduction).contiguous()


@reduce_backward_op.register_fake
def _reduce_backward_fake(grad_out: Tensor, x: Tensor, out: Tensor, aux: Tensor, reduction: str,
                          backend: str) -> Tensor:
    if reduction in MEMBER_INDEPENDENT_GRAD:
        return out.new_empty(out.shape)
    return x.new_empty(x.shape)


def _reduce_setup_context(ctx, inputs, output) -> None:
    x, reduction, backend = inputs
    out, aux = output
    ctx.save_for_backward(x, out, aux)
    ctx.reduction = reduction
    ctx.backend = backend
    ctx.mark_non_differentiable(aux)


def _reduce_backward_formula(ctx, grad_out: Tensor, _grad_aux: Tensor):
    x, out, aux = ctx.saved_tensors
    grad = reduce_backward_op(grad_out.contiguous(), x, out, aux, ctx.reduction, ctx.backend)
    if ctx.reduction in MEMBER_INDEPENDENT_GRAD:
        # Every member gets the same gradient: expand it over N with a zero stride instead of copying N times.
        grad = grad.to(x.dtype).unsqueeze(0).expand(x.shape)
    return grad, None, None


reduce_op.register_autograd(_reduce_backward_formula, setup_context=_reduce_setup_context)


@torch.library.custom_op("fused_ensemble::stats", mutates_args=())
def stats_op(x: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Ensemble statistics of [N, R, K] logits in one pass (the fields of ``EnsembleStats``, per row)."""
    return tuple(t.contiguous() for t in kernels(backend).stats_forward(x))


@stats_op.register_fake
def _stats_fake(x: Tensor, backend: str):
    _, rows, classes = x.shape
    dtype = compute_dtype(x.dtype)
    probs = x.new_empty((rows, classes), dtype=dtype)
    per_row = [x.new_empty((rows,), dtype=dtype) for _ in range(4)]
    prediction = x.new_empty((rows,), dtype=torch.int64)
    return (probs, *per_row, prediction, x.new_empty((rows,), dtype=dtype))


def _plain_eager_call(x: Tensor) -> bool:
    """Whether a custom op call on ``x`` would do nothing but call its kernel: eager mode (not traced by
    torch.compile), a plain tensor (no FakeTensor or other subclass), no dispatch mode (FlopCounterMode,
    FakeTensorMode, ...) and nothing to differentiate. Then calling the kernel directly skips about 7 us of
    custom-op dispatch a call (a third of the public API's host time on a CPU at small sizes)."""
    return (type(x) is Tensor and not torch.compiler.is_compiling()
            and _python_dispatch._get_current_dispatch_mode() is None
            and not (x.requires_grad and torch.is_grad_enabled()))


def reduce(x: Tensor, reduction: str, backend: str) -> tuple[Tensor, Tensor]:
    """``reduce_op``, or its kernel directly where that is all the op would do."""
    if _plain_eager_call(x):
        out, aux = kernels(backend).reduce_forward(x, reduction)
        return out.contiguous(), aux.contiguous()
    return reduce_op(x, reduction, backend)


def stats(x: Tensor, backend: str) -> tuple[Tensor, ...]:
    """``stats_op``, or its kernel directly where that is all the op would do."""
    if _plain_eager_call(x):
        return tuple(t.contiguous() for t in kernels(backend).stats_forward(x))
    return stats_op(x, backend)

