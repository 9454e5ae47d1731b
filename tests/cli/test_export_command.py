"""The ``export`` command end to end: random members or checkpoints in, a safetensors checkpoint, an ONNX file or an
AOTInductor package out, each read back and checked against the eager module by the command itself; user mistakes
end with one line and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fused_ensemble import load
from fused_ensemble.cli import main
from fused_ensemble.cli.models import LeNet5, build_model

from member_factories import make_members


def export(capsys, *arguments: str) -> tuple[int, str, str]:
    code = main(["export", *arguments])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_random_members_to_safetensors(tmp_path, capsys):
    out = tmp_path / "lenet.safetensors"
    code, stdout, _ = export(capsys, "--model", "lenet", "--members", "3", "--format", "safetensors", "--out",
                             str(out), "--reduction", "log_mean_probs")
    assert code == 0
    assert f"wrote {out} (" in stdout and "MB): safetensors checkpoint, 3 x lenet" in stdout
    assert "equal bit for bit" in stdout
    fused = load(out, LeNet5)
    assert fused.num_members == 3 and fused.reduction == "log_mean_probs"


def test_member_checkpoints_to_onnx(tmp_path, capsys):
    paths = []
    for index, member in enumerate(make_members(LeNet5, n=2, seed=21)):
        paths.append(tmp_path / f"member{index}.pt")
        torch.save({"state_dict": {f"module.{k}": v for k, v in member.state_dict().items()}}, paths[-1])
    out = tmp_path / "lenet.onnx"
    code, stdout, _ = export(capsys, "--model", "lenet", "--checkpoints", *map(str, paths), "--format", "onnx",
                             "--out", str(out), "--batch", "3")
    assert code == 0
    assert "ONNX opset 18, 2 x lenet, outputs probs, prediction, confidence, entropy, mutual_info" in stdout
    assert "ONNX Runtime vs the eager module on batches of 3 and 6: max |difference|" in stdout


def test_an_ensemble_checkpoint_optimized_to_onnx_with_a_static_batch(tmp_path, capsys):
    checkpoint = tmp_path / "mlp.safetensors"
    assert export(capsys, "--model", "mlp", "--members", "2", "--format", "safetensors", "--out",
                  str(checkpoint))[0] == 0
    code, stdout, _ = export(capsys, "--model", "mlp", "--checkpoints", str(checkpoint), "--optimize", "--format",
                             "onnx", "--out", str(tmp_path / "mlp.onnx"), "--outputs", "output", "--static-batch")
    assert code == 0
    assert "2 x mlp optimized, outputs output, static batch" in stdout and "on batches of 2:" in stdout


def test_a_checkpoint_to_a_pt2_package_then_predict_with_both(tmp_path, capsys):
    checkpoint, package = tmp_path / "mlp.safetensors", tmp_path / "mlp.pt2"
    assert export(capsys, "--model", "mlp", "--members", "2", "--format", "safetensors", "--out",
                  str(checkpoint))[0] == 0
    code, stdout, _ = export(capsys, "--model", "mlp", "--checkpoints", str(checkpoint), "--format", "pt2", "--out",
                             str(package))
    assert code == 0
    assert "AOTInductor package (CPU), 2 x mlp" in stdout
    assert "the AOTInductor package vs the eager module on batches of 2 and 5" in stdout
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32))
    predictions = []
    for artifact in ([str(package)], [str(checkpoint), "--model", "mlp"]):
        assert main(["predict", *artifact, str(tmp_path / "x.npy"), "--json"]) == 0
        predictions.append(json.loads(capsys.readouterr().out)["predictions"])
    for compiled, eager in zip(*predictions, strict=True):
        assert compiled["class"] == eager["class"]
        for key in ("probability", "entropy", "mutual_info"):
            assert compiled[key] == pytest.approx(eager[key], abs=1e-5)


@pytest.mark.parametrize("arguments, message", [
    (["--members", "2", "--format", "onnx", "--out", "x.pt2"], "--out 'x.pt2' must end with .onnx for --format onnx"),
    (["--members", "2", "--format", "safetensors", "--out", "x.safetensors", "--optimize"],
     "--optimize applies to onnx and pt2"),
    (["--format", "onnx", "--out", "x.onnx"], "give --members N"),
    (["--members", "0", "--format", "onnx", "--out", "x.onnx"], "give --members N"),
    (["--members", "2", "--format", "onnx", "--out", "x.onnx", "--batch", "0"], "--batch must be >= 1"),
    (["--members", "3", "--checkpoints", "a.pt", "b.pt", "--format", "onnx", "--out", "x.onnx"],
     "--members 3 but 2 checkpoint files were given"),
    (["--checkpoints", "missing.pt", "--format", "onnx", "--out", "x.onnx"], "missing.pt: no such file (member 0)"),
])
def test_argument_mistakes(tmp_path, capsys, monkeypatch, arguments, message):
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = export(capsys, "--model", "lenet", *arguments)
    assert code == 2 and stdout == ""
    assert stderr.strip() == f"fused-ensemble export: error: {stderr.strip().split('error: ', 1)[1]}"
    assert message in stderr and len(stderr.strip().splitlines()) == 1


def test_checkpoints_of_another_model(tmp_path, capsys):
    path = tmp_path / "mlp.pt"
    torch.save(build_model("mlp").state_dict(), path)
    code, _, stderr = export(capsys, "--model", "lenet", "--checkpoints", str(path), "--format", "onnx", "--out",
                             str(tmp_path / "x.onnx"))
    assert code == 2 and f"{path}: member 0: the checkpoint does not hold the tensors" in stderr


def test_a_model_that_cannot_take_a_dynamic_batch(tmp_path, capsys):
    code, _, stderr = export(capsys, "--model", "vit-cifar", "--members", "2", "--format", "onnx", "--out",
                             str(tmp_path / "vit.onnx"))
    assert code == 2 and "export with dynamic_batch=False" in stderr


def test_the_command_line_reports_a_mistake_without_a_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fused_ensemble", "export", "--model", "lenet", "--checkpoints",
                           str(tmp_path / "none.pt"), "--format", "onnx", "--out", str(tmp_path / "x.onnx")],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"fused-ensemble export: error: {tmp_path / 'none.pt'}: no such file (member 0)"]
