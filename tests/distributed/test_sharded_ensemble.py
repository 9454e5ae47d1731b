"""ShardedEnsemble over gloo process groups of 2, 3 and 4 CPU processes started by the tests: every reduction, the
statistics and "none" equal one process's FusedEnsemble; members trained sharded (and with a data dimension) equal
members trained in one process; a checkpoint written by 2 ranks reads back on 3 ranks and in a plain process, bit for
bit; a failure on one rank stops the others with a PeerFailure.

The ranks of one world size run every check in one start of the processes (starting them costs seconds here) and
report each check's outcome, which the tests below read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from sharded_workers import (
    REDUCTIONS,
    build_training_cnn,
    data_parallel_worker,
    failing_worker,
    forward_and_load_worker,
    forward_and_save_worker,
    recorded,
    run_ranks,
    truth,
)

from fused_ensemble import FusedEnsemble
from fused_ensemble.distributed import load, read_metadata

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

FORWARD_CHECKS = ([f"forward N={n} {r}" for n in (4, 5, 8) for r in (*REDUCTIONS, "none")]
                  + [f"stats N={n}" for n in (4, 5, 8)] + [f"non-finite and ties {r}" for r in REDUCTIONS]
                  + ["non-finite stats", "member_inputs", "tuple and shared inputs", "bytes sent"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("sharded") / "checkpoint")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, checkpoint):
    results = tmp_path_factory.mktemp("two-ranks")
    run_ranks(forward_and_save_worker, 2, str(results), checkpoint)
    return recorded(results, 2)


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory, two_ranks, checkpoint):
    results = tmp_path_factory.mktemp("three-ranks")
    run_ranks(forward_and_load_worker, 3, str(results), checkpoint)
    return recorded(results, 3)


def _passed(outcomes: dict, check: str) -> None:
    failures = [outcome for outcome in outcomes[check] if outcome != "ok"]
    assert not failures, failures[0]


@pytest.mark.parametrize("check", FORWARD_CHECKS)
def test_forward_on_2_ranks_equals_one_process(two_ranks, check):
    _passed(two_ranks, check)


@pytest.mark.parametrize("check", FORWARD_CHECKS)
def test_forward_on_3_ranks_equals_one_process(three_ranks, check):
    _passed(three_ranks, check)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_members_trained_on_2_ranks_equal_members_trained_in_one_process(two_ranks, optimizer):
    _passed(two_ranks, f"train {optimizer}")


def test_a_checkpoint_of_2_ranks_reads_back_on_3_ranks_bit_for_bit(two_ranks, three_ranks):
    _passed(two_ranks, "save")
    _passed(three_ranks, "load")


def test_a_checkpoint_of_2_ranks_reads_back_in_one_process_bit_for_bit(two_ranks, checkpoint):
    _passed(two_ranks, "save")
    description = read_metadata(checkpoint)
    assert description["num_members"] == 5 and description["reduction"] == "mean" and description["member_inputs"]
    fused = load(checkpoint, build_training_cnn)
    assert isinstance(fused, FusedEnsemble) and fused.num_members == 5
    expected = truth(checkpoint)
    for name, stacked in fused.stacked.state_dict().items():
        for index in range(5):
            assert torch.equal(stacked[index], expected[f"{index}/{name}"]), (index, name)


def test_a_checkpoint_index_that_would_build_other_objects_is_refused(two_ranks, checkpoint, tmp_path):
    import os
    import pickle
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(checkpoint, copy)
    with open(copy / ".metadata", "wb") as f:
        pickle.dump(os.getcwd, f)  # a callable from another module: not an index
    with pytest.raises(pickle.UnpicklingError, match="may not build posix.getcwd"):
        load(str(copy), build_training_cnn)


@pytest.mark.slow
def test_a_member_by_data_mesh_of_4_ranks_trains_as_one_process(tmp_path):
    run_ranks(data_parallel_worker, 4, str(tmp_path))
    outcomes = recorded(tmp_path, 4)
    for check in ("train sgd", "train adamw", "forward"):
        _passed(outcomes, check)


@pytest.mark.parametrize("inside_collective", [False, True], ids=["between-collectives", "inside-a-collective"])
def test_an_exception_on_one_rank_stops_the_other_with_a_peer_failure(tmp_path, inside_collective):
    run_ranks(failing_worker, 2, str(tmp_path), inside_collective)
    failed, other = (json.loads(Path(tmp_path, f"rank{rank}.json").read_text()) for rank in (1, 0))
    assert other["error"] == "PeerFailure"
    assert "rank 1: ValueError: boom in step 2" in other["message"]
    assert 1 in other["ranks"]
    if inside_collective:
        # Rank 0 left its all-reduce on the 5 s timeout, then learned why at the step boundary.
        assert other["ranks"] == [0, 1] and other["seconds"] < 60
        assert failed["error"] == "PeerFailure"
    else:
        assert other["ranks"] == [1] and other["seconds"] < 30
        assert failed["error"] == "ValueError" and failed["message"] == "boom in step 2"
