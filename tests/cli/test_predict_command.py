"""The ``predict`` command end to end on a safetensors checkpoint and an ONNX file (the AOTInductor package is
covered with ``export``): inputs from .npy, .pt and image files, the printed table and JSON equal to the eager
ensemble's statistics, and a one-line error with exit code 2 for every user mistake."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fused_ensemble import FusedEnsemble, ensemble_stats, export_onnx, save
from fused_ensemble.cli import main
from fused_ensemble.cli.export import PREDICT_OUTPUTS
from fused_ensemble.cli.models import LeNet5

from member_factories import make_members


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("artifacts")
    members = make_members(LeNet5, n=3, seed=31)
    fused = FusedEnsemble(members, reduction="none").eval()
    save(fused, folder / "lenet.safetensors")
    export_onnx(fused, torch.randn(2, 1, 28, 28), folder / "lenet.onnx", outputs=PREDICT_OUTPUTS)
    export_onnx(fused, torch.randn(2, 1, 28, 28), folder / "output-only.onnx", outputs=("output",))
    export_onnx(fused, torch.randn(2, 1, 28, 28), folder / "static.onnx", outputs=PREDICT_OUTPUTS,
                dynamic_batch=False)
    return fused, folder


def predict(capsys, *arguments) -> tuple[int, str, str]:
    code = main(["predict", *map(str, arguments)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def expected_rows(fused, x: torch.Tensor) -> list[tuple]:
    with torch.no_grad():
        stats = ensemble_stats(fused(x))
    return [(int(stats.prediction[i]), float(stats.confidence[i]), float(stats.entropy[i]),
             float(stats.mutual_info[i])) for i in range(x.shape[0])]


def assert_rows(rows: list[dict], fused, x: torch.Tensor) -> None:
    expected = expected_rows(fused, x)
    assert len(rows) == len(expected)
    for row, (label, probability, entropy, mutual_info) in zip(rows, expected):
        assert row["class"] == label
        assert row["probability"] == pytest.approx(probability, abs=1e-5)
        assert row["entropy"] == pytest.approx(entropy, abs=1e-5)
        assert row["mutual_info"] == pytest.approx(mutual_info, abs=1e-5)


@pytest.mark.parametrize("artifact", ["lenet.safetensors", "lenet.onnx"])
def test_a_batch_from_npy(artifacts, tmp_path, capsys, artifact):
    fused, folder = artifacts
    x = torch.randn(5, 1, 28, 28)
    np.save(tmp_path / "x.npy", x.double().numpy())  # float64 is cast to the artifact's float32
    model = ["--model", "lenet"] if artifact.endswith(".safetensors") else []
    code, stdout, _ = predict(capsys, folder / artifact, tmp_path / "x.npy", *model, "--json")
    assert code == 0
    result = json.loads(stdout)
    assert [row["sample"] for row in result["predictions"]] == ["0", "1", "2", "3", "4"]
    assert_rows(result["predictions"], fused, x)
    code, table, _ = predict(capsys, folder / artifact, tmp_path / "x.npy", *model)
    assert code == 0
    assert table.splitlines()[0].split() == ["sample", "class", "probability", "entropy", "mutual_info"]
    assert len(table.splitlines()) == 6


def test_one_sample_from_a_torch_file(artifacts, tmp_path, capsys):
    fused, folder = artifacts
    x = torch.randn(1, 28, 28)
    torch.save(x, tmp_path / "x.pt")
    code, stdout, _ = predict(capsys, folder / "lenet.onnx", tmp_path / "x.pt", "--json")
    assert code == 0
    assert_rows(json.loads(stdout)["predictions"], fused, x.unsqueeze(0))


def test_image_files(artifacts, tmp_path, capsys):
    fused, folder = artifacts
    paths = []
    for index in range(2):
        paths.append(tmp_path / f"digit{index}.png")
        Image.fromarray(np.random.default_rng(index).integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(paths[-1])
    code, stdout, _ = predict(capsys, folder / "lenet.onnx", *paths, "--json")
    assert code == 0
    rows = json.loads(stdout)["predictions"]
    assert [row["sample"] for row in rows] == [str(p) for p in paths]
    # What the command documents: grayscale for one channel, resized bilinearly to the model's input, in [0, 1].
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("L").resize((28, 28), Image.Resampling.BILINEAR),
                                                 dtype=np.float32) / 255).unsqueeze(0) for p in paths])
    assert_rows(rows, fused, x)


def bad_files(folder: Path) -> dict[str, Path]:
    np.save(folder / "wrong-shape.npy", np.zeros((2, 3, 28, 28), np.float32))
    np.save(folder / "integers.npy", np.zeros((2, 1, 28, 28), np.int64))
    np.save(folder / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(folder / "x.npy", np.zeros((3, 1, 28, 28), np.float32))
    torch.save({"x": torch.zeros(1, 28, 28)}, folder / "dict.pt")
    torch.save(Path("a path object"), folder / "object.pt")  # unpickling it would need a Python class
    (folder / "model.bin").write_bytes(b"\0" * 16)
    (folder / "broken.onnx").write_bytes(b"not an onnx file")
    (folder / "broken.pt2").write_bytes(b"not a package")
    (folder / "broken.png").write_bytes(b"not a picture")
    return {path.name: path for path in folder.iterdir()}


@pytest.mark.parametrize("artifact, inputs, message", [
    ("missing.onnx", ["x.npy"], "missing.onnx: no such file"),
    ("model.bin", ["x.npy"], "unknown artifact type .bin; expected .safetensors, .onnx or .pt2"),
    ("broken.onnx", ["x.npy"], "broken.onnx: ONNX Runtime cannot load it"),
    ("broken.pt2", ["x.npy"], "broken.pt2: not an AOTInductor package (not a zip archive)"),
    ("lenet.onnx", ["broken.png"], "broken.png: not an image Pillow can read"),
    ("lenet.safetensors", ["x.npy"], "a safetensors checkpoint needs --model NAME"),
    ("lenet.safetensors", ["x.npy", "--model", "mlp"], "holds fused_ensemble.cli.models.LeNet5 members"),
    ("output-only.onnx", ["x.npy"], "its outputs are output; predict needs probs, entropy, mutual_info"),
    ("static.onnx", ["x.npy"], "takes batches of exactly 2 samples"),
    ("lenet.onnx", ["missing.npy"], "missing.npy: no such file"),
    ("lenet.onnx", ["wrong-shape.npy"], "shape (2, 3, 28, 28); the artifact takes samples of shape (1, 28, 28)"),
    ("lenet.onnx", ["integers.npy"], "holds torch.int64 values; expected floating-point samples"),
    ("lenet.onnx", ["objects.npy"], "objects.npy: not a numeric .npy array"),
    ("lenet.onnx", ["dict.pt"], "dict.pt: holds a dict, expected one tensor"),
    ("lenet.onnx", ["object.pt"], "object.pt: torch.load(weights_only=True) cannot read it as a tensor"),
    ("lenet.onnx", ["x.npy", "x.npy"], "INPUT is one .npy or .pt file, or image files"),
])
def test_user_mistakes(artifacts, tmp_path, capsys, artifact, inputs, message):
    _, folder = artifacts
    files = bad_files(tmp_path)
    artifact_path = folder / artifact if (folder / artifact).exists() else files.get(artifact, tmp_path / artifact)
    arguments = [a if a.startswith("--") or a in ("mlp",) else files.get(a, tmp_path / a) for a in inputs]
    code, stdout, stderr = predict(capsys, artifact_path, *arguments)
    assert code == 2 and stdout == ""
    assert stderr.startswith("fused-ensemble predict: error: ") and len(stderr.strip().splitlines()) == 1
    assert message in stderr
