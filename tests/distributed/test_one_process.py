"""ShardedEnsemble in a process group of one process (what a script does before it is started with torchrun): it holds
every member and equals FusedEnsemble; its training, evaluation and checkpoint functions equal the single-process ones;
mistakes get clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from sharded_workers import build_cnn, build_training_cnn, dataset, images

from fused_ensemble import REDUCTIONS, FusedEnsemble, evaluate, member_batches, optim
from fused_ensemble.distributed import (
    FailTogether,
    ShardedEnsemble,
    load,
    load_state,
    member_mesh,
    save,
)
from fused_ensemble.distributed import evaluate as sharded_evaluate
from fused_ensemble.distributed import member_batches as sharded_member_batches

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_without_a_process_group_the_error_says_what_to_do():
    with pytest.raises(RuntimeError, match="init_process_group"):
        ShardedEnsemble(build_cnn, 4)


@pytest.mark.parametrize("reduction", [*REDUCTIONS, "none"])
def test_one_rank_holds_every_member_and_equals_fused_ensemble(one_process_group, reduction):
    sharded = ShardedEnsemble(build_cnn, 3, reduction=reduction)
    assert sharded.member_indices == range(3) and sharded.data_ranks == 1 and sharded.data_rank == 0
    fused = FusedEnsemble([build_cnn(i) for i in range(3)], reduction=reduction)
    x = images(4)
    torch.testing.assert_close(sharded(x), fused(x).detach(), rtol=1e-5, atol=1e-6)
    assert not sharded(x).requires_grad


def test_per_member_values_and_the_optimizer_factory(one_process_group):
    sharded = ShardedEnsemble(build_cnn, 3)
    assert sharded.local_values(0.1) == 0.1
    assert sharded.local_values([0.1, 0.2, 0.3]) == [0.1, 0.2, 0.3]
    assert sharded.local_values(torch.tensor(0.5)) == 0.5
    with pytest.raises(ValueError, match="lr has 2 values, but the ensemble has 3 members"):
        sharded.local_values([0.1, 0.2], "lr")
    optimizer = sharded.optimizer(optim.AdamW, lr=[1e-3, 2e-3, 3e-3], betas=(0.9, [0.99, 0.98, 0.97]),
                                  weight_decay=0.01)
    assert optimizer.num_members == 3
    assert optimizer.param_groups[0]["betas"] == (0.9, [0.99, 0.98, 0.97])


def test_member_batches_training_and_evaluation_equal_the_single_process_functions(one_process_group):
    x, y = dataset()
    expected = list(member_batches(x, y, 3, 4, "bootstrap", torch.Generator().manual_seed(1)))
    sharded = ShardedEnsemble(build_training_cnn, 3, member_inputs=True)
    got = list(sharded_member_batches(sharded, x, y, 4, "bootstrap", torch.Generator().manual_seed(1)))
    assert len(got) == len(expected)
    for (gx, gy), (ex, ey) in zip(got, expected):
        assert torch.equal(gx, ex) and torch.equal(gy, ey)
    fused = FusedEnsemble([build_training_cnn(i) for i in range(3)], reduction="none", member_inputs=True)
    ours, theirs = sharded_evaluate(sharded, x, y), evaluate(fused, x, y)
    torch.testing.assert_close(ours.pop("_ensemble_probs"), theirs.pop("_ensemble_probs"))
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_fail_together_passes_when_nothing_failed(one_process_group):
    guard = FailTogether()
    for _ in range(3):
        with guard:
            pass
    assert guard.steps == 3
    with pytest.raises(ZeroDivisionError), guard:  # the rank's own error propagates
        raise ZeroDivisionError("mine")


def test_save_and_load_in_a_group_of_one_and_in_no_group(one_process_group, tmp_path):
    sharded = ShardedEnsemble(build_training_cnn, 3, reduction="log_mean_probs", member_inputs=True)
    optimizer = sharded.optimizer(optim.SGD, lr=0.1, momentum=0.9)
    x, y = dataset()
    for xb, yb in list(sharded_member_batches(sharded, x, y, 4, "shuffle", torch.Generator().manual_seed(0)))[:2]:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(sharded.member_outputs(xb).flatten(0, 1), yb.flatten()).backward()
        optimizer.step()
    save(sharded, str(tmp_path / "checkpoint"), optimizer=optimizer)
    again = load(str(tmp_path / "checkpoint"), build_training_cnn)
    assert isinstance(again, ShardedEnsemble) and again.reduction == "log_mean_probs" and again.member_inputs
    for name, tensor in sharded.local.state_dict().items():
        assert torch.equal(again.local.state_dict()[name], tensor), name
    fresh = again.optimizer(optim.SGD, lr=0.1, momentum=0.9)
    load_state(str(tmp_path / "checkpoint"), again, fresh)
    for parameter, state in zip(sharded.local.parameters(), (fresh.state[p] for p in again.local.parameters())):
        for key, value in optimizer.state[parameter].items():
            assert torch.equal(state[key], value), key
    dist.destroy_process_group()
    try:
        plain = load(str(tmp_path / "checkpoint"), build_training_cnn)
        assert isinstance(plain, FusedEnsemble)
        for name, tensor in sharded.local.state_dict().items():
            assert torch.equal(plain.state_dict()[name], tensor), name
    finally:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def test_mistakes_get_clear_errors(one_process_group, tmp_path):
    with pytest.raises(TypeError, match="build_member must be a function"):
        ShardedEnsemble([build_cnn(0)], 1)
    with pytest.raises(ValueError, match="unknown reduction"):
        ShardedEnsemble(build_cnn, 2, reduction="median")
    with pytest.raises(ValueError, match="num_members must be a positive int, got 0"):
        ShardedEnsemble(build_cnn, 0)
    with pytest.raises(TypeError, match=r"build_member\(0\) returned a str"):
        ShardedEnsemble(lambda index: "member", 1)
    with pytest.raises(ValueError, match="a mesh of 2 member ranks x 1 data ranks needs 2 processes"):
        member_mesh(members=2)
    sharded = ShardedEnsemble(build_cnn, 3, member_inputs=True)
    with pytest.raises(ValueError, match=r"expects input 0 of shape \[N, B, ...\] with N=3 members"):
        sharded(images(2, 4))
    with pytest.raises(FileNotFoundError, match="ensemble.json is missing"):
        load(str(tmp_path), build_cnn)
    save(sharded, str(tmp_path / "checkpoint"))
    with pytest.raises(ValueError, match="do not match the checkpoint's"):
        load(str(tmp_path / "checkpoint"), lambda index: torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="saved without an optimizer state"):
        load_state(str(tmp_path / "checkpoint"), sharded, sharded.optimizer(optim.SGD, lr=0.1))
