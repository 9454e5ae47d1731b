"""``export_onnx``: a fused ensemble as an ONNX file that ONNX Runtime (or any ONNX runtime) runs with standard
operators only.

The module is exported with ``torch.export`` (dynamic batch), its ensemble ops are decomposed into the PyTorch
reference's aten ops (``decompositions``), and ``torch.onnx.export(dynamo=True)`` translates the graph to ONNX opset
``OPSET`` of the default domain: Conv, MatMul, Softmax, ReduceMean, ReduceLogSumExp, ... The file's metadata names
the opset, the producer, the number of members, the reduction and the outputs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from fused_ensemble.deploy.exportable import BATCH, batch_dim, check_outputs, export_program

OPSET = 18
"""The ONNX opset (default domain ``ai.onnx``) of exported files: run by ONNX Runtime 1.14 and later, and by the ONNX
backends of inference servers built on it."""
INPUT_NAME = "input"
STANDARD_DOMAINS = ("", "ai.onnx")


def _name_batch_dim(model, symbol: str) -> None:
    """Renames the exporter's symbol for the batch size (``s77``, ...) to ``"batch"`` in the graph's inputs and
    outputs, where runtimes and servers show it."""
    import onnx_ir as ir

    for value in (*model.graph.inputs, *model.graph.outputs):
        if value.shape is None:
            continue
        dims = [BATCH if isinstance(d, ir.SymbolicDim) and d.value == symbol else d for d in value.shape]
        value.shape = ir.Shape(dims)


def _check_standard_operators(model, path: Path) -> None:
    used = {node.domain for node in model.graph.all_nodes()} | {f.domain for f in model.functions.values()}
    custom = sorted(domain for domain in used if domain not in STANDARD_DOMAINS)
    if custom:
        raise RuntimeError(f"{path}: the exported graph uses operators of domains {custom}, which ONNX Runtime does "
                           f"not provide")


def export_onnx(module: nn.Module, example_input: torch.Tensor, path: str | os.PathLike, dynamic_batch: bool = True,
                outputs: Sequence[str] = ("output",)) -> Path:
    """Exports a ``FusedEnsemble`` or ``OptimizedEnsemble`` (in eval mode) to an ONNX file of opset 18 with standard
    operators only: ONNX Runtime runs it without fused_ensemble.

    Args:
        module: the ensemble. An ``OptimizedEnsemble`` is exported as it computes (BatchNorm folded, its dtype, its
            convolution strategies and execution), without its CUDA graph, compiled forward or fused Triton head.
        example_input: an input batch (its dtype and per-sample shape are fixed in the file).
        path: the ``.onnx`` file to write. Files over 2 GB keep their weights in a ``.data`` file beside it.
        dynamic_batch: whether the file takes any batch size (the input's batch dim is named ``"batch"``) or only the
            example's.
        outputs: the file's outputs, by name and in this order: ``"output"``, the module's own output (its
            reduction of the member outputs), and any field of ``EnsembleStats`` (``"probs"``, ``"entropy"``,
            ``"expected_entropy"``, ``"mutual_info"``, ``"confidence"``, ``"prediction"``, ``"disagreement"``),
            computed from the member outputs of the same forward pass.

    Returns:
        The path written. The input is named ``"input"``; the outputs are named as in ``outputs``. The metadata
        (``metadata_props``) holds ``onnx_opset``, ``producer``, ``num_members``, ``reduction``, ``member_inputs``
        and ``outputs``.
    """
    import fused_ensemble

    path = Path(path)
    outputs = check_outputs(outputs)
    program = export_program(module, example_input, dynamic_batch, outputs)
    onnx_program = torch.onnx.export(program, (example_input,), dynamo=True, opset_version=OPSET,
                                     input_names=[INPUT_NAME], output_names=list(outputs), verbose=False)
    model = onnx_program.model
    if dynamic_batch:
        shape = model.graph.inputs[0].shape
        _name_batch_dim(model, shape[batch_dim(module)].value)
    _check_standard_operators(model, path)
    model.metadata_props.update({
        "onnx_opset": str(OPSET),
        "producer": f"fused_ensemble {fused_ensemble.__version__}",
        "num_members": str(module.num_members),
        "reduction": module.reduction,
        "member_inputs": str(module.member_inputs).lower(),
        "outputs": ",".join(outputs),
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx_program.save(str(path))
    return path
