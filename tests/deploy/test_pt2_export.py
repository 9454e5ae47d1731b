"""``export_pt2``: an AOTInductor package that ``torch._inductor.aoti_load_package`` runs in a fresh process that has
torch only (fused_ensemble cannot be imported there), equal to the eager module within 1e-5 in float32, on CPU and
(marked ``gpu``) on CUDA. Compiling is the slow part: the CPU tests share one package of a small CNN."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fused_ensemble import FusedEnsemble, export_pt2
from fused_ensemble.cli.models import small_cnn
from fused_ensemble.deploy.exportable import OUTPUTS, EnsembleOutputs

from member_factories import make_members

ATOL = 1e-5
FRESH_PROCESS = """
import sys
sys.modules["fused_ensemble"] = None  # importing it would fail: the package must not need it
import torch
torch.backends.cuda.matmul.allow_tf32 = False  # compared in float32 against an eager run without TF32
torch.backends.cudnn.allow_tf32 = False
runner = torch._inductor.aoti_load_package(sys.argv[1])
outputs = {}
for name in sys.argv[3:]:
    x = torch.load(f"{sys.argv[2]}/{name}.pt", weights_only=True)
    result = runner(x)
    outputs[name] = [t.cpu() for t in (result if isinstance(result, (tuple, list)) else [result])]
torch.save({"outputs": outputs, "metadata": runner.get_metadata()}, f"{sys.argv[2]}/results.pt")
"""


def run_in_a_fresh_process(package: Path, inputs: dict[str, torch.Tensor], folder: Path) -> dict:
    for name, x in inputs.items():
        torch.save(x, folder / f"{name}.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(package), str(folder), *inputs],
                          capture_output=True, text=True, cwd=folder, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(folder / "results.pt", weights_only=True)


def assert_outputs_match(actual: list[torch.Tensor], module, x: torch.Tensor, outputs) -> None:
    with torch.no_grad():
        expected = EnsembleOutputs(module, outputs)(x.to(next(module.parameters()).device))
    expected = expected if isinstance(expected, tuple) else (expected,)
    for name, a, e in zip(outputs, actual, expected, strict=True):
        torch.testing.assert_close(a, e.cpu(), rtol=0, atol=ATOL, msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def cpu_package(tmp_path_factory):
    fused = FusedEnsemble(make_members(lambda: small_cnn(1, 5), n=3, seed=12)).eval()
    folder = tmp_path_factory.mktemp("pt2")
    # An example batch of one: the package still takes any batch size.
    return fused, export_pt2(fused, torch.randn(1, 1, 8, 8), folder / "ensemble.pt2", outputs=OUTPUTS)


def test_a_fresh_process_with_torch_only_runs_the_package(cpu_package, tmp_path):
    fused, package = cpu_package
    inputs = {"one": torch.randn(1, 1, 8, 8), "six": torch.randn(6, 1, 8, 8)}
    results = run_in_a_fresh_process(package, inputs, tmp_path)
    for name, x in inputs.items():
        assert_outputs_match(results["outputs"][name], fused, x, OUTPUTS)
    metadata = results["metadata"]
    assert metadata["num_members"] == "3" and metadata["outputs"] == ",".join(OUTPUTS)
    assert metadata["sample_shape"] == "1,8,8" and metadata["input_dtype"] == "float32"
    assert metadata["producer"].startswith("fused_ensemble ")


def test_the_package_in_this_process(cpu_package):
    fused, package = cpu_package
    runner = torch._inductor.aoti_load_package(str(package))
    x = torch.randn(4, 1, 8, 8)
    assert_outputs_match(list(runner(x)), fused, x, OUTPUTS)


@pytest.mark.gpu
def test_a_cuda_package_in_a_fresh_process(tmp_path):
    fused = FusedEnsemble(make_members(lambda: small_cnn(3, 10), n=4, seed=13)).eval().cuda()
    package = export_pt2(fused, torch.randn(2, 3, 16, 16, device="cuda"), tmp_path / "cuda.pt2",
                         outputs=("output", "mutual_info"))
    inputs = {"two": torch.randn(2, 3, 16, 16, device="cuda"), "five": torch.randn(5, 3, 16, 16, device="cuda")}
    results = run_in_a_fresh_process(package, inputs, tmp_path)
    assert results["metadata"]["AOTI_DEVICE_KEY"].startswith("cuda")
    for name, x in inputs.items():
        assert_outputs_match(results["outputs"][name], fused, x, ("output", "mutual_info"))
