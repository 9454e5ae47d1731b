"""Checkpoints of a training run: atomic writes, plain contents only, loads that run no code, RNG states."""

import os
import pickle

import pytest
import torch

from fused_ensemble.training import checkpoint


def test_round_trip_of_plain_contents(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    state = {"epoch": 3, "lr": [0.1, 0.2], "betas": (0.9, [0.99, 0.9]), "name": "run", "none": None, "flag": True,
             "tensors": {0: torch.arange(4.0), "b": torch.ones(2, 3, dtype=torch.float64)}}
    checkpoint.save_checkpoint(path, state)
    loaded = checkpoint.load_checkpoint(path)
    assert loaded["betas"] == [0.9, [0.99, 0.9]]  # tuples are written as lists
    assert loaded["epoch"] == 3 and loaded["name"] == "run" and loaded["none"] is None and loaded["flag"] is True
    assert torch.equal(loaded["tensors"][0], state["tensors"][0]) and torch.equal(loaded["tensors"]["b"],
                                                                                  state["tensors"]["b"])
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_anything_but_plain_contents_is_refused_on_save_and_on_load(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    with pytest.raises(TypeError, match=r"state\['model'\]\['f'\] is a builtin_function_or_method"):
        checkpoint.save_checkpoint(path, {"model": {"f": print}})
    with pytest.raises(TypeError, match="dict keys must be strings or ints"):
        checkpoint.save_checkpoint(path, {(1, 2): 3})
    assert os.listdir(tmp_path) == []
    # A file written otherwise, holding an object whose unpickling would run code: refused, nothing runs.
    marker = tmp_path / "ran"
    torch.save({"epoch": 1, "payload": RunsCode(str(marker))}, path)
    with pytest.raises(pickle.UnpicklingError):
        checkpoint.load_checkpoint(path)
    assert not marker.exists()


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    checkpoint.save_checkpoint(path, {"epoch": 1})

    def torn_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(path) == {"epoch": 1}
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]


def test_partial_writes_of_a_killed_run_are_discarded(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    leftover = tmp_path / ".checkpoint.pt.abc123.tmp"
    leftover.write_bytes(b"torn")
    other = tmp_path / "notes.tmp"
    other.write_text("not ours")
    assert checkpoint.discard_partial_writes(path) == [str(leftover)]
    assert not leftover.exists() and other.exists()


def test_rng_states_restore_the_same_draws(tmp_path):
    data_order = torch.Generator().manual_seed(5)
    torch.rand(3), torch.rand(2, generator=data_order)
    path = str(tmp_path / "checkpoint.pt")
    checkpoint.save_checkpoint(path, {"rng": checkpoint.rng_states("cpu", {"data_order": data_order})})
    expected = torch.rand(5), torch.randperm(7, generator=data_order)
    torch.rand(11), torch.rand(13, generator=data_order)  # the run goes on, then dies

    states = checkpoint.load_checkpoint(path)["rng"]
    assert all(isinstance(s, torch.Tensor) for s in (states["torch"], *states["generators"].values()))
    fresh = torch.Generator()
    checkpoint.set_rng_states(states, "cpu", {"data_order": fresh})
    assert torch.equal(torch.rand(5), expected[0]) and torch.equal(torch.randperm(7, generator=fresh), expected[1])
    with pytest.raises(ValueError, match=r"saved generator states are \['data_order'\]"):
        checkpoint.set_rng_states(states, "cpu", {})


@pytest.mark.gpu
def test_rng_states_include_the_cuda_generator():
    states = checkpoint.rng_states("cuda")
    expected = torch.rand(4, device="cuda")
    checkpoint.set_rng_states(states, "cuda")
    assert torch.equal(torch.rand(4, device="cuda"), expected)
