"""The ``bench`` command end to end on a tiny workload. Timings are not checked (they live in bench/); the output's
structure and the correctness checks the command does itself are."""

from __future__ import annotations

import json

import torch

from fused_ensemble.cli import main


def test_bench_cli_writes_every_method(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--model", "lenet", "--members", "2", "--batch", "3", "--device", "cpu", "--reps", "2",
                 "--optimize", "--compile-vmap", "--optimize-compile", "--no-progress", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert set(result["results"]) == {"loop", "vmap", "fused", "vmap_compile", "optimized", "optimized_compile"}
    for name, row in result["results"].items():
        assert row["ms"] > 0 and len(row["times_ms"]) >= 2, name
        assert row["relative_error_vs_loop"] < 1e-4, name
    assert result["environment"]["torch"] == torch.__version__
    assert "vmap_compile" in capsys.readouterr().out
