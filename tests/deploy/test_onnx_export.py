"""``export_onnx``: every model of the benchmark zoo and every reduction, run in ONNX Runtime (standard operators
only, nothing of fused_ensemble: checked in a process that cannot import it) against the eager module, at the export
batch size and another one, within 1e-5 in float32."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn

from fused_ensemble import REDUCTIONS, FusedEnsemble, export_onnx
from fused_ensemble.cli.models import MODELS, LeNet5, build_model, small_cnn
from fused_ensemble.deploy.exportable import OUTPUTS, EnsembleOutputs
from fused_ensemble.deploy.onnx_export import OPSET

from member_factories import make_members

ATOL = 1e-5
SMALL_INPUTS = {"resnet18": (3, 32, 32), "resnet50": (3, 32, 32), "vgg11_bn": (3, 32, 32),
                "mobilenet_v2": (3, 32, 32)}
"""The smallest inputs the ImageNet models take (global pooling makes them size-agnostic): 224 x 224 is slow here."""
SLOW = {"resnet50", "vgg11_bn"}
STATIC_ONLY = {"vit-cifar": "torch.vmap's batching rule of cat specializes the batch size of ViT's expanded class "
                            "token"}


def run_onnx(path, x: torch.Tensor) -> list[np.ndarray]:
    runtime = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return runtime.run(None, {"input": x.numpy()})


def assert_onnx_matches(path, module, x, outputs=("output",)) -> None:
    with torch.no_grad():
        expected = EnsembleOutputs(module, outputs)(x)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for name, actual, reference in zip(outputs, run_onnx(path, x), expected, strict=True):
        actual = torch.from_numpy(actual)
        assert actual.dtype == reference.dtype and actual.shape == reference.shape, name
        torch.testing.assert_close(actual, reference, rtol=0, atol=ATOL, msg=lambda m: f"{name}: {m}")


def zoo_ensemble(name: str, n: int = 2) -> tuple[FusedEnsemble, tuple[int, ...]]:
    members = make_members(lambda: build_model(name), n=n, seed=7)
    return FusedEnsemble(members).eval(), SMALL_INPUTS.get(name, MODELS[name][1])


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name
                                  for name in MODELS])
def test_every_zoo_model_runs_in_onnx_runtime(tmp_path, name):
    fused, sample = zoo_ensemble(name)
    path = tmp_path / f"{name}.onnx"
    x = torch.randn(2, *sample)
    if name in STATIC_ONLY:
        with pytest.raises(ValueError, match="dynamic_batch=False"):
            export_onnx(fused, x, path)
        export_onnx(fused, x, path, dynamic_batch=False)
        assert_onnx_matches(path, fused, x)
        return
    export_onnx(fused, x, path)
    for batch in (2, 3):
        assert_onnx_matches(path, fused, torch.randn(batch, *sample))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_every_reduction(tmp_path, reduction):
    fused = FusedEnsemble(make_members(lambda: build_model("mlp"), n=3, seed=8), reduction=reduction).eval()
    path = export_onnx(fused, torch.randn(3, 1, 28, 28), tmp_path / "mlp.onnx")
    for batch in (3, 5):
        assert_onnx_matches(path, fused, torch.randn(batch, 1, 28, 28))


def test_stats_outputs_and_the_file_itself(tmp_path):
    fused = FusedEnsemble(make_members(LeNet5, n=3, seed=9)).eval()
    path = export_onnx(fused, torch.randn(4, 1, 28, 28), tmp_path / "lenet.onnx", outputs=OUTPUTS)
    x = torch.randn(6, 1, 28, 28)
    assert_onnx_matches(path, fused, x, OUTPUTS)
    model = onnx.load(str(path))
    assert [(o.domain, o.version) for o in model.opset_import] == [("", OPSET)]
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}
    assert {"Softmax", "ReduceMean", "ArgMax"} <= {node.op_type for node in model.graph.node}
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    assert metadata["onnx_opset"] == str(OPSET) and metadata["num_members"] == "3"
    assert metadata["reduction"] == "mean_probs" and metadata["outputs"] == ",".join(OUTPUTS)
    assert [o.name for o in model.graph.output] == list(OUTPUTS)
    (graph_input,) = model.graph.input
    assert graph_input.name == "input"
    assert [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim] == ["batch", 1, 28, 28]


def test_onnx_runtime_alone_in_a_fresh_process(tmp_path):
    fused = FusedEnsemble(make_members(LeNet5, n=2, seed=10)).eval()
    path = export_onnx(fused, torch.randn(2, 1, 28, 28), tmp_path / "lenet.onnx", outputs=("output", "mutual_info"))
    x = torch.randn(5, 1, 28, 28)
    np.save(tmp_path / "x.npy", x.numpy())
    script = ("import sys\n"
              "sys.modules['fused_ensemble'] = None  # importing it would fail: the file must not need it\n"
              "import numpy as np, onnxruntime\n"
              "runtime = onnxruntime.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
              "probs, mutual_info = runtime.run(None, {'input': np.load(sys.argv[2])})\n"
              "np.save(sys.argv[3], probs); np.save(sys.argv[4], mutual_info)\n"
              "assert 'torch' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "x.npy"), str(tmp_path / "p.npy"),
                           str(tmp_path / "mi.npy")], capture_output=True, text=True, cwd=tmp_path,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr
    with torch.no_grad():
        probs, mutual_info = EnsembleOutputs(fused, ("output", "mutual_info"))(x)
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "p.npy")), probs, rtol=0, atol=ATOL)
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "mi.npy")), mutual_info, rtol=0, atol=ATOL)


def test_an_optimized_ensemble(tmp_path):
    fused = FusedEnsemble(make_members(lambda: small_cnn(1, 10), n=2, seed=11)).eval()
    optimized = fused.optimize(torch.randn(3, 1, 8, 8))
    for execution in dict.fromkeys([optimized.execution, "fused"]):
        optimized.execution = execution  # the one it chose, then its tuned fused graph (BatchNorm folded)
        path = export_onnx(optimized, torch.randn(3, 1, 8, 8), tmp_path / f"{execution}.onnx",
                           outputs=("output", "entropy"))
        for batch in (3, 4):
            x = torch.randn(batch, 1, 8, 8)
            assert_onnx_matches(path, optimized, x, ("output", "entropy"))
            with torch.no_grad():
                torch.testing.assert_close(torch.from_numpy(run_onnx(path, x)[0]), fused(x), rtol=0, atol=ATOL)


def test_member_inputs_and_a_batch_of_one(tmp_path):
    members = [nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)) for _ in range(3)]
    fused = FusedEnsemble(members, reduction="log_mean_probs", member_inputs=True).eval()
    path = export_onnx(fused, torch.randn(3, 1, 6), tmp_path / "bagged.onnx")  # [N, B=1, F]
    for batch in (1, 7):
        assert_onnx_matches(path, fused, torch.randn(3, batch, 6))


def test_a_static_batch(tmp_path):
    fused = FusedEnsemble([nn.Linear(6, 4) for _ in range(2)]).eval()
    path = export_onnx(fused, torch.randn(3, 6), tmp_path / "static.onnx", dynamic_batch=False)
    assert_onnx_matches(path, fused, torch.randn(3, 6))
    with pytest.raises(Exception, match="dimension"):
        run_onnx(path, torch.randn(4, 6))


def test_refusals(tmp_path):
    fused = FusedEnsemble([nn.Linear(6, 4) for _ in range(2)])
    with pytest.raises(ValueError, match=r"training mode: call \.eval\(\)"):
        export_onnx(fused, torch.randn(2, 6), tmp_path / "a.onnx")
    with pytest.raises(ValueError, match="unknown output 'logits'"):
        export_onnx(fused.eval(), torch.randn(2, 6), tmp_path / "a.onnx", outputs=("logits",))
    with pytest.raises(TypeError, match="FusedEnsemble or an OptimizedEnsemble"):
        export_onnx(nn.Linear(6, 4), torch.randn(2, 6), tmp_path / "a.onnx")
    assert not (tmp_path / "a.onnx").exists()
