"""The ensemble ops of an exported graph become the PyTorch reference's aten ops: nothing of fused_ensemble is left,
the results are the reference's, and a graph that reads the backward-only output of ``reduce`` is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fused_ensemble import REDUCTIONS, FusedEnsemble
from fused_ensemble.deploy.decompositions import decompose_ensemble_ops, ensemble_ops_in
from fused_ensemble.ops.reference import reduce_reference, stats_reference


class ReduceCall(nn.Module):
    """Calls the custom op itself (the backend string is irrelevant: export traces its fake implementation)."""

    def __init__(self, reduction: str, read_aux: bool = False):
        super().__init__()
        self.reduction, self.read_aux = reduction, read_aux

    def forward(self, x):
        out, aux = torch.ops.fused_ensemble.reduce(x, self.reduction, "triton")
        return (out, aux) if self.read_aux else out


class StatsCall(nn.Module):
    def forward(self, x):
        return torch.ops.fused_ensemble.stats(x, "triton")


def export(module: nn.Module, x: torch.Tensor) -> torch.export.ExportedProgram:
    return torch.export.export(module, (x,), dynamic_shapes={"x": {1: torch.export.Dim("rows", min=1)}}, strict=False)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reduce_becomes_the_reference(reduction):
    program = export(ReduceCall(reduction), torch.randn(3, 4, 7))
    assert ensemble_ops_in(program) == ["fused_ensemble.reduce.default"]
    decomposed = decompose_ensemble_ops(program)
    assert ensemble_ops_in(decomposed) == []
    x = torch.randn(3, 9, 7)
    torch.testing.assert_close(decomposed.module()(x), reduce_reference(x, reduction), rtol=0, atol=0)


def test_stats_becomes_the_reference():
    decomposed = decompose_ensemble_ops(export(StatsCall(), torch.randn(4, 2, 5)))
    assert ensemble_ops_in(decomposed) == []
    x = torch.randn(4, 6, 5)
    for actual, expected in zip(decomposed.module()(x), stats_reference(x), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_a_graph_that_reads_the_backward_output_is_refused():
    with pytest.raises(RuntimeError, match="auxiliary output of fused_ensemble.reduce.default"):
        decompose_ensemble_ops(export(ReduceCall("mean_probs", read_aux=True), torch.randn(3, 4, 7)))


def test_a_fused_ensemble_graph_keeps_no_ensemble_op():
    from fused_ensemble.deploy.exportable import export_program

    fused = FusedEnsemble([nn.Linear(5, 3) for _ in range(2)]).eval()
    program = export_program(fused, torch.randn(2, 5), outputs=("output", "mutual_info"))
    assert ensemble_ops_in(program) == []
    x = torch.randn(4, 5)
    with torch.no_grad():
        probs, _ = program.module()(x)
        torch.testing.assert_close(probs, fused(x), rtol=0, atol=1e-6)
