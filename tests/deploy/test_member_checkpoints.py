"""``FusedEnsemble.from_checkpoints`` and ``save_members``: the per-member checkpoints users have (safetensors files,
torch state_dict files in the three common layouts, DataParallel prefixes), one member module alive at a time, and a
clear ValueError for every file that does not fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fused_ensemble import FusedEnsemble
from fused_ensemble.cli.models import LeNet5

from member_factories import assert_state_equal, make_members


@pytest.fixture
def members():
    return make_members(LeNet5, n=3, seed=4)


class CountingBuilder:
    """``build_member`` that counts its calls."""

    def __init__(self, **kwargs):
        self.calls, self.kwargs = 0, kwargs

    def __call__(self):
        self.calls += 1
        return LeNet5(**self.kwargs)


def assert_same_ensemble(fused: FusedEnsemble, members) -> None:
    assert fused.num_members == len(members)
    for loaded, member in zip(fused.to_members(), members):
        assert_state_equal(loaded.state_dict(), member.state_dict())
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(fused.eval()(x), FusedEnsemble(members, reduction=fused.reduction).eval()(x))


def test_safetensors_member_files_one_member_module_at_a_time(tmp_path, members):
    paths = []
    for index, member in enumerate(members):
        paths.append(tmp_path / f"m{index}.safetensors")
        save_file(member.state_dict(), paths[-1])
    build = CountingBuilder()
    fused = FusedEnsemble.from_checkpoints(paths, build, reduction="softmax_of_mean")
    assert build.calls == 1  # the stacks come from one member's structure
    assert fused.reduction == "softmax_of_mean"
    assert_same_ensemble(fused, members)


def test_the_three_torch_styles_and_the_dataparallel_prefix(tmp_path, members):
    states = [member.state_dict() for member in members]
    layouts = [
        states[0],                                                              # a bare state_dict
        {"state_dict": {f"module.{k}": v for k, v in states[1].items()}, "epoch": 3},  # DDP, with training state
        {"model": states[2], "optimizer": {"lr": 0.1}},
    ]
    paths = []
    for index, layout in enumerate(layouts):
        paths.append(tmp_path / f"m{index}.pt")
        torch.save(layout, paths[-1])
    assert_same_ensemble(FusedEnsemble.from_checkpoints(paths, LeNet5), members)
    torch.save({"module": {f"module.{k}": v for k, v in states[0].items()}}, tmp_path / "m0.pth")
    fused = FusedEnsemble.from_checkpoints([tmp_path / "m0.pth", paths[1], tmp_path / "m0.pth"], LeNet5)
    assert_same_ensemble(fused, [members[0], members[1], members[0]])


def test_save_members_files_load_into_a_member(tmp_path, members):
    fused = FusedEnsemble(members)
    paths = fused.save_members(tmp_path / "members")
    assert [p.name for p in paths] == ["member_0.safetensors", "member_1.safetensors", "member_2.safetensors"]
    for path, member in zip(paths, members):
        fresh = LeNet5()
        fresh.load_state_dict(load_file(path))
        assert_state_equal(fresh.state_dict(), member.state_dict())
    assert_same_ensemble(FusedEnsemble.from_checkpoints(paths, LeNet5), members)


def test_save_members_pads_the_index(tmp_path):
    fused = FusedEnsemble([torch.nn.Linear(2, 2) for _ in range(11)])
    names = [p.name for p in fused.save_members(tmp_path)]
    assert names[0] == "member_00.safetensors" and names[-1] == "member_10.safetensors" and names == sorted(names)


# ---- files that do not fit -------------------------------------------------------------------------------------

@pytest.fixture
def member_files(tmp_path, members) -> list[Path]:
    return FusedEnsemble(members).save_members(tmp_path / "members")


def test_a_shape_mismatch_names_the_file_member_tensor_and_both_shapes(member_files):
    with pytest.raises(ValueError, match=rf"{member_files[0]}: member 0: classifier\.4\.weight has shape \(10, 84\) in "
                                         rf"the checkpoint, the member build_member\(\) builds has shape \(7, 84\)"):
        FusedEnsemble.from_checkpoints(member_files, lambda: LeNet5(num_classes=7))


@pytest.mark.parametrize("style", ["safetensors", "torch"])
def test_missing_and_unexpected_keys(tmp_path, member_files, members, style):
    state = dict(members[1].state_dict())
    state["extra.weight"] = state.pop("features.0.weight")
    bad = tmp_path / f"bad.{style}"
    save_file(state, bad) if style == "safetensors" else torch.save(state, bad)
    with pytest.raises(ValueError, match=rf"{bad}: member 1: .*missing keys \[features\.0\.weight\], unexpected keys "
                                         rf"\[extra\.weight\]"):
        FusedEnsemble.from_checkpoints([member_files[0], bad], LeNet5)


def test_a_dtype_mismatch(tmp_path, member_files, members):
    bad = tmp_path / "half.pt"
    torch.save(members[2].half().state_dict(), bad)
    with pytest.raises(ValueError, match=rf"{bad}: member 2: features\.0\.weight is torch\.float16 in the checkpoint"):
        FusedEnsemble.from_checkpoints([*member_files[:2], bad], LeNet5)


class Payload:
    """An object whose unpickling would run code: torch.load(weights_only=True) must refuse it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_code_is_never_run(tmp_path, member_files):
    marker = tmp_path / "code-ran"
    bad = tmp_path / "payload.pt"
    torch.save({"state_dict": Payload(str(marker))}, bad)
    with pytest.raises(ValueError, match=rf"{bad}: member 1: torch\.load\(weights_only=True\) refuses it: it "
                                         rf"needs the Python global"):
        FusedEnsemble.from_checkpoints([member_files[0], bad], LeNet5)
    assert not marker.exists()


def test_a_checkpoint_without_a_state_dict(tmp_path, member_files):
    bad = tmp_path / "stats.pt"
    torch.save({"epoch": 3, "accuracy": 0.9}, bad)
    with pytest.raises(ValueError, match=r"member 0: holds a dict with keys \['accuracy', 'epoch'\], not a state_dict"):
        FusedEnsemble.from_checkpoints([bad], LeNet5)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_torch_file(tmp_path, members, damage):
    bad = tmp_path / "bad.pt"
    torch.save(members[0].state_dict(), bad)
    data = bad.read_bytes()
    bad.write_bytes(data[:len(data) // 2] if damage == "truncated" else b"not a checkpoint at all" * 10)
    with pytest.raises(ValueError, match=rf"{bad}: member 0: neither a safetensors file nor a torch file"):
        FusedEnsemble.from_checkpoints([bad], LeNet5)


def test_a_truncated_safetensors_file(member_files):
    data = member_files[1].read_bytes()
    member_files[1].write_bytes(data[:-7])
    with pytest.raises(ValueError, match=rf"{member_files[1]}: "):
        FusedEnsemble.from_checkpoints(member_files, LeNet5)


def test_bad_path_lists(tmp_path, member_files):
    with pytest.raises(ValueError, match="at least one checkpoint"):
        FusedEnsemble.from_checkpoints([], LeNet5)
    with pytest.raises(TypeError, match="a list of checkpoint files"):
        FusedEnsemble.from_checkpoints(str(member_files[0]), LeNet5)
    with pytest.raises(FileNotFoundError, match=r"missing\.pt: no such file \(member 1\)"):
        FusedEnsemble.from_checkpoints([member_files[0], tmp_path / "missing.pt"], LeNet5)
    with pytest.raises(TypeError, match="must return an nn.Module"):
        FusedEnsemble.from_checkpoints(member_files, lambda: "not a module")
