"""The ensemble ops of an exported graph rewritten as the PyTorch reference's aten ops.

``torch.export`` keeps ``fused_ensemble::reduce`` and ``fused_ensemble::stats`` as opaque custom-op calls: an ONNX
exporter has no translation for them, and an AOTInductor package would need this package's library loaded to run
them. ``decompose_ensemble_ops`` replaces each call by what ``fused_ensemble.ops.reference`` computes (softmax, mean,
logsumexp, ... as aten ops): the functions that are the ops' test oracle, so every reduction the reference knows
exports to standard ONNX operators and compiles with Inductor. ``reduce``'s second output (``aux``) is read by the
backward pass only: an inference graph that reads it is refused rather than given a stand-in.
"""

from __future__ import annotations

import operator

import torch
from torch.export import ExportedProgram

from fused_ensemble.ops import library  # noqa: F401  (registers the torch.ops.fused_ensemble ops)
from fused_ensemble.ops.reference import reduce_reference, stats_reference

ENSEMBLE_NAMESPACES = ("fused_ensemble", "fused_ensemble_ext")
"""The operator namespaces of this package: none may remain in an exported graph."""


def _reduce_as_reference(x: torch.Tensor, reduction: str, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    # The second output stands in for aux: check_inference_only made sure that nothing reads it.
    return reduce_reference(x, reduction, dim=0), x.new_empty((0,))


def _stats_as_reference(x: torch.Tensor, backend: str) -> tuple[torch.Tensor, ...]:
    return tuple(stats_reference(x, dim=0))


def ensemble_op_decompositions() -> dict:
    """``fused_ensemble``'s custom ops -> functions computing them with the reference's aten ops, for
    ``ExportedProgram.run_decompositions``."""
    return {torch.ops.fused_ensemble.reduce.default: _reduce_as_reference,
            torch.ops.fused_ensemble.stats.default: _stats_as_reference}


def ensemble_ops_in(program: ExportedProgram) -> list[str]:
    """The names of the calls to this package's operators in ``program``'s graph."""
    found = []
    for node in program.graph.nodes:
        namespace = getattr(node.target, "namespace", None)
        if node.op == "call_function" and namespace in ENSEMBLE_NAMESPACES:
            found.append(str(node.target))
    return found


def check_inference_only(program: ExportedProgram) -> None:
    """Raises unless every ``fused_ensemble::reduce`` call in ``program`` has only its first output read."""
    reduce_op = torch.ops.fused_ensemble.reduce.default
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target is not reduce_op:
            continue
        for user in node.users:
            reads_out = user.op == "call_function" and user.target is operator.getitem and user.args[1] == 0
            if not reads_out and user.users:
                raise RuntimeError(f"the exported graph reads the auxiliary output of {node.target} (node "
                                   f"{user.name}), which only the backward pass uses; export an inference forward")


def decompose_ensemble_ops(program: ExportedProgram) -> ExportedProgram:
    """``program`` with every ensemble op replaced by the reference's aten ops (every other op is lowered to ATen IR
    as ``run_decompositions`` does, no further). Raises a RuntimeError if a call to this package's operators
    remains: an artifact with one would need fused_ensemble installed where it runs."""
    check_inference_only(program)
    decomposed = program.run_decompositions(ensemble_op_decompositions())
    remaining = ensemble_ops_in(decomposed)
    if remaining:
        raise RuntimeError(f"the exported graph still calls {', '.join(sorted(set(remaining)))}, which only "
                           f"fused_ensemble provides: the artifact would need fused_ensemble installed where it runs. "
                           f"fused_ensemble.deploy.decompositions has no decomposition for it")
    return decomposed
