"""``fused_ensemble.save`` / ``load``: one safetensors file, bit-for-bit round trips (in a fresh process too), subsets
of members read slice by slice, and a clear ValueError for every file that is not what it should be."""

from __future__ import annotations

import copy
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fused_ensemble import FusedEnsemble, load, save
from fused_ensemble.cli.models import LeNet5, build_model

from member_factories import assert_state_equal, make_members

ROOT = Path(__file__).resolve().parents[2]


def lenet_ensemble(n: int = 3, seed: int = 1, **kwargs) -> tuple[FusedEnsemble, list[nn.Module]]:
    members = make_members(LeNet5, n=n, seed=seed)
    return FusedEnsemble(members, **kwargs).eval(), members


def header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return length, json.loads(f.read(length))


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_save_then_load_in_a_fresh_process_is_bit_for_bit(tmp_path):
    fused, _ = lenet_ensemble()
    path = save(fused, tmp_path / "ensemble.safetensors")
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        expected = fused(x)
    save_file({"x": x}, tmp_path / "x.safetensors")
    script = ("import sys, torch\n"
              "from safetensors.torch import load_file, save_file\n"
              "from fused_ensemble import load\n"
              "from fused_ensemble.cli.models import build_model\n"
              "fused = load(sys.argv[1], lambda: build_model('lenet')).eval()\n"
              "with torch.no_grad():\n"
              "    save_file({'out': fused(load_file(sys.argv[2])['x'])}, sys.argv[3])\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "x.safetensors"),
                           str(tmp_path / "out.safetensors")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert torch.equal(load_file(tmp_path / "out.safetensors")["out"], expected)


@pytest.mark.parametrize("member_inputs", [False, True])
def test_load_restores_tensors_reduction_and_inputs(tmp_path, member_inputs):
    fused, _ = lenet_ensemble(reduction="log_mean_probs", member_inputs=member_inputs)
    # Strided (channels_last) stacks are stored contiguous, with the same values.
    path = save(copy.deepcopy(fused).to(memory_format=torch.channels_last), tmp_path / "ensemble.safetensors")
    loaded = load(path, LeNet5)
    assert (loaded.num_members, loaded.reduction, loaded.member_inputs) == (3, "log_mean_probs", member_inputs)
    assert_state_equal(loaded.state_dict(), fused.state_dict())
    x = torch.randn(3, 2, 1, 28, 28) if member_inputs else torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), fused(x))


def test_a_subset_of_members_loads_in_the_order_asked(tmp_path):
    fused, members = lenet_ensemble(n=4)
    path = save(fused, tmp_path / "ensemble.safetensors")
    subset = load(path, LeNet5, members=[3, 0])
    assert subset.num_members == 2
    for position, index in enumerate([3, 0]):
        assert_state_equal(subset.to_members()[position].state_dict(), members[index].state_dict())
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(subset.eval()(x), FusedEnsemble([members[3], members[0]]).eval()(x))


def test_only_the_requested_members_slices_are_read(tmp_path):
    fused, _ = lenet_ensemble(n=3)
    path = save(fused, tmp_path / "ensemble.safetensors")
    length, entries = header(path)
    begin, end = entries["features.0.weight"]["data_offsets"]
    flip_byte(path, 8 + length + begin + (end - begin) // 3 + 5)  # a byte of member 1's slice
    load(path, LeNet5, members=[0, 2])  # member 1's damaged bytes are never read
    with pytest.raises(ValueError, match=r"member 1: its tensors do not match the digest.*corrupted"):
        load(path, LeNet5)


def test_device_and_dtype(tmp_path):
    fused, _ = lenet_ensemble(n=2)
    loaded = load(save(fused, tmp_path / "e.safetensors"), LeNet5, device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in loaded.parameters())
    assert loaded.state_dict()["stacked.features.0.bias"].equal(fused.state_dict()["stacked.features.0.bias"].double())
    with pytest.raises(TypeError, match="floating-point"):
        load(tmp_path / "e.safetensors", LeNet5, dtype=torch.int32)


def test_save_refuses_an_optimized_ensemble(tmp_path):
    fused = FusedEnsemble([nn.Linear(4, 3) for _ in range(2)]).eval()
    with pytest.raises(TypeError, match="FusedEnsemble it was made from"):
        save(fused.optimize(torch.randn(2, 4)), tmp_path / "e.safetensors")


# ---- files that are not what they should be --------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path) -> Path:
    fused, _ = lenet_ensemble(n=3)
    return save(fused, tmp_path / "ensemble.safetensors")


def test_a_torch_file_is_not_a_safetensors_file(tmp_path):
    path = tmp_path / "ensemble.pt"
    torch.save(lenet_ensemble(n=2)[0].state_dict(), path)
    with pytest.raises(ValueError, match=f"{path}: not a readable safetensors file"):
        load(path, LeNet5)


@pytest.mark.parametrize("keep", [0.5, 0.999, 20], ids=["half", "last-bytes", "inside-the-header"])
def test_a_truncated_file(saved, keep):
    data = saved.read_bytes()
    saved.write_bytes(data[:int(len(data) * keep)] if keep < 1 else data[:keep])
    with pytest.raises(ValueError, match=f"{saved}: not a readable safetensors file"):
        load(saved, LeNet5)


def test_a_corrupted_header(saved):
    flip_byte(saved, 12)
    with pytest.raises(ValueError, match=f"{saved}: not a readable safetensors file"):
        load(saved, LeNet5)


def test_a_member_file_is_not_an_ensemble_checkpoint(saved, tmp_path):
    member_file = load(saved, LeNet5).save_members(tmp_path / "members")[0]
    with pytest.raises(ValueError, match="not a fused_ensemble checkpoint.*from_checkpoints"):
        load(member_file, LeNet5)


def test_another_member_class(saved):
    with pytest.raises(ValueError, match=r"holds fused_ensemble\.cli\.models\.LeNet5 members, build_member\(\) "
                                         r"builds a fused_ensemble\.cli\.models\.MLP"):
        load(saved, lambda: build_model("mlp"))


def test_a_shape_mismatch_names_the_file_member_tensor_and_both_shapes(saved):
    with pytest.raises(ValueError, match=rf"{saved}: member 0: classifier\.4\.weight has shape \(10, 84\) in the "
                                         rf"checkpoint, the member build_member\(\) builds has shape \(5, 84\)"):
        load(saved, lambda: LeNet5(num_classes=5))


def test_missing_and_unexpected_keys(tmp_path):
    path = save(FusedEnsemble([nn.Sequential(nn.Linear(4, 3)) for _ in range(2)]), tmp_path / "e.safetensors")
    with pytest.raises(ValueError, match=r"member 0: .*missing keys \[2\.weight, 2\.bias\], unexpected keys \[\]"):
        load(path, lambda: nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))


def test_a_dtype_mismatch(saved):
    with pytest.raises(ValueError, match=r"member 0: features\.0\.weight is torch\.float32 in the checkpoint.*"
                                         r"torch\.float64"):
        load(saved, lambda: LeNet5().double())


@pytest.mark.parametrize("members, message", [
    ([0, 3], r"asks for member 3, but the file holds 3 members \(0 to 2\)"),
    ([1, 1], "names a member twice"),
    ([], "selects no member"),
])
def test_members_the_file_does_not_hold(saved, members, message):
    with pytest.raises(ValueError, match=message):
        load(saved, LeNet5, members=members)


def test_metadata_that_disagrees_with_the_tensors(saved, tmp_path):
    from safetensors import safe_open

    with safe_open(str(saved), "pt") as f:
        metadata, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    metadata.update(num_members="4", member_digests=json.dumps(json.loads(metadata["member_digests"]) + ["0"]))
    save_file(tensors, tmp_path / "bad.safetensors", metadata=metadata)
    with pytest.raises(ValueError, match="says it stacks 4 members: the file is corrupted"):
        load(tmp_path / "bad.safetensors", LeNet5)


def test_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load(tmp_path / "nothing.safetensors", LeNet5)
