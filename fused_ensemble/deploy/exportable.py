"""The forward that an ONNX file or an AOTInductor package computes, and its ``torch.export``.

``EnsembleOutputs`` wraps a ``FusedEnsemble`` or an ``OptimizedEnsemble`` and returns the outputs asked for by name:
``"output"`` (the module's own forward: its reduction of the member outputs) and any field of ``EnsembleStats``
(``probs``, ``entropy``, ``expected_entropy``, ``mutual_info``, ``confidence``, ``prediction``, ``disagreement``),
computed from the member outputs of one forward pass. ``export_program`` exports it with a dynamic batch dim and
replaces the ensemble ops with the reference's aten ops (``decompositions``), so the graph needs nothing of this
package.

An ``OptimizedEnsemble`` is exported through its eager forward: a CUDA graph, a ``torch.compile``d forward and the
fused Triton head are process-bound choices that an exported graph cannot hold, and are set aside while tracing (the
batch-norm folding, cast weights, convolution strategies, memory format and execution it chose are kept).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.export import ExportedProgram

from fused_ensemble.deploy.decompositions import decompose_ensemble_ops
from fused_ensemble.fused import FusedEnsemble
from fused_ensemble.inference.optimized import OptimizedEnsemble
from fused_ensemble.ops.ensemble_reduce import ensemble_stats, reduce_members
from fused_ensemble.ops.reductions import EnsembleStats

OUTPUTS = ("output", *EnsembleStats._fields)
"""The names an artifact's outputs are chosen from: the module's own output, and the fields of ``EnsembleStats``."""
BATCH = "batch"
"""The name of the dynamic batch dim."""


def check_outputs(outputs: Sequence[str]) -> tuple[str, ...]:
    if isinstance(outputs, str):
        outputs = (outputs,)
    outputs = tuple(outputs)
    if not outputs:
        raise ValueError(f"outputs must name at least one of {', '.join(OUTPUTS)}")
    unknown = [name for name in outputs if name not in OUTPUTS]
    if unknown:
        raise ValueError(f"unknown output {unknown[0]!r}; expected names from {', '.join(OUTPUTS)}")
    if len(set(outputs)) != len(outputs):
        raise ValueError(f"outputs {list(outputs)} names an output twice")
    return outputs


def check_exportable(module: nn.Module) -> None:
    if not isinstance(module, (FusedEnsemble, OptimizedEnsemble)):
        raise TypeError(f"expected a FusedEnsemble or an OptimizedEnsemble, got a {type(module).__name__}")
    # An OptimizedEnsemble runs its eval-mode forward whatever its training flag says.
    if isinstance(module, FusedEnsemble) and module.training:
        raise ValueError("the module is in training mode: call .eval() before exporting it (a training-mode graph "
                         "would normalize with batch statistics and apply dropout)")


@contextlib.contextmanager
def _traceable(module: nn.Module, reduction: str | None) -> Iterator[None]:
    """``module`` with ``reduction`` (None: its own) and, for an ``OptimizedEnsemble``, its eager forward."""
    changes = {} if reduction is None else {"reduction": reduction}
    if isinstance(module, OptimizedEnsemble):
        changes.update(cuda_graph=False, compiled=False, head_backend="gemm")
    saved = {name: getattr(module, name) for name in changes}
    try:
        for name, value in changes.items():
            setattr(module, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


class EnsembleOutputs(nn.Module):
    """The outputs ``outputs`` (names from ``OUTPUTS``) of ``module`` on an input batch: one tensor, or a tuple in the
    order of ``outputs``. Stats fields are ``ensemble_stats`` of the member outputs (float32; ``prediction`` int64)."""

    def __init__(self, module: nn.Module, outputs: Sequence[str] = ("output",)):
        super().__init__()
        check_exportable(module)
        self.module = module
        self.outputs = check_outputs(outputs)
        self.reduction = module.reduction

    def forward(self, x: torch.Tensor):
        if self.outputs == ("output",):
            with _traceable(self.module, None):
                return self.module(x)
        with _traceable(self.module, "none"):
            member_outputs = self.module(x)
        stats = ensemble_stats(member_outputs)
        values = {name: getattr(stats, name) for name in EnsembleStats._fields}
        values["output"] = reduce_members(member_outputs, self.reduction) if "output" in self.outputs else None
        found = tuple(values[name] for name in self.outputs)
        return found[0] if len(found) == 1 else found


def batch_dim(module: nn.Module) -> int:
    """The batch dim of the module's input: 1 for ``member_inputs=True`` (``[N, B, ...]``), else 0."""
    return 1 if module.member_inputs else 0


def export_program(module: nn.Module, example_input: torch.Tensor, dynamic_batch: bool = True,
                   outputs: Sequence[str] = ("output",)) -> ExportedProgram:
    """``torch.export`` of ``EnsembleOutputs(module, outputs)`` on ``example_input``, with the ensemble ops
    decomposed into aten ops. With ``dynamic_batch`` the batch dim is symbolic (named ``"batch"``, any size from 1;
    an example batch of 1 is traced as a batch of 2, since torch.export specializes sizes 0 and 1)."""
    wrapper = EnsembleOutputs(module, outputs)
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a tensor (the members take one input), got "
                        f"{type(example_input).__name__}")
    dim = batch_dim(module)
    if example_input.dim() <= dim or example_input.shape[dim] == 0:
        raise ValueError(f"example_input must have a non-empty batch dim {dim}, got shape "
                         f"{tuple(example_input.shape)}")
    x, dynamic_shapes = example_input, None
    if dynamic_batch:
        if x.shape[dim] == 1:
            x = torch.cat([x, x], dim)
        dynamic_shapes = {"x": {dim: torch.export.Dim(BATCH, min=1)}}
    with torch.no_grad():
        try:
            program = torch.export.export(wrapper, (x,), dynamic_shapes=dynamic_shapes, strict=False)
        except torch._dynamo.exc.UserError as error:
            if not dynamic_batch or "specialized it to be a constant" not in str(error):
                raise
            first_line = str(error).splitlines()[0]
            raise ValueError(f"the fused forward fixes the batch size while it is traced (an op of the model, or its "
                             f"batching rule under torch.vmap, needs a concrete batch size), so it cannot be exported "
                             f"with a dynamic batch: export with dynamic_batch=False (the artifact then takes batches "
                             f"of {example_input.shape[dim]} only). torch.export said: {first_line}") from error
    return decompose_ensemble_ops(program)
