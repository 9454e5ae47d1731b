"""The per-rank statistics of the sharded reductions, without any process group: random logits split over simulated
ranks (even and uneven blocks, one member per rank, one rank), each rank's statistics computed from its block and
combined by hand as the all-reduces combine them, against the float64 reference of all members, and against the
single-process ops on non-finite logits and ties (equal, NaN rows included; "vote" bit for bit)."""

from __future__ import annotations

import math

import pytest
import torch
from sharded_workers import awkward_logits

from fused_ensemble import REDUCTIONS, ensemble_reduce, ensemble_stats, metrics
from fused_ensemble.distributed import member_blocks
from fused_ensemble.distributed.collectives import CollectiveRecord
from fused_ensemble.distributed.evaluation import pairwise_disagreement_from_votes
from fused_ensemble.distributed.partial import (
    finish_log_mean_probs,
    finish_reduce,
    finish_stats,
    log_probability_maxima,
    reduce_sharded,
    shifted_exponential_sums,
    stats_statistics,
    sum_statistics,
    vote_counts,
)
from fused_ensemble.ops.reference import reduce_reference, stats_reference

SPLITS = [(5, 2), (5, 3), (8, 3), (4, 4), (7, 1), (1, 1)]  # (members, ranks)


def simulated(logits: torch.Tensor, ranks: int, reduction: str) -> torch.Tensor:
    """The sharded reduction of ``logits`` over ``ranks`` simulated ranks, each all-reduce done by hand."""
    blocks = [logits[block.start:block.stop] for block in member_blocks(logits.shape[0], ranks)]
    if reduction == "log_mean_probs":
        maxima = [log_probability_maxima(block) for block in blocks]
        maximum = torch.stack(maxima).amax(0)
        exponential_sum = sum(shifted_exponential_sums(part, maximum) for part in maxima)
        return finish_log_mean_probs(maximum, exponential_sum, logits.shape[0])
    return finish_reduce(sum(sum_statistics(block, reduction) for block in blocks), reduction, logits.shape[0])


def expected(logits: torch.Tensor, reduction: str) -> torch.Tensor:
    return reduce_reference(logits.double(), reduction).float()


def assert_matches(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1.3e-6 * 8, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("members, ranks", SPLITS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_statistics_of_simulated_ranks_combine_to_the_reference(members, ranks, reduction):
    logits = torch.randn(members, 9, 13) * 3
    assert_matches(simulated(logits, ranks, reduction), expected(logits, reduction))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", ["large", "minus-inf", "tiny-probabilities", "rows-3d", "bf16", "non-contiguous",
                                  "empty-batch", "one-class", "large-k"])
def test_weird_inputs(reduction, case):
    logits = torch.randn(5, 6, 11)
    if case == "large":
        logits = logits * 1e4
    elif case == "minus-inf":
        logits[:, 0, 3] = -math.inf  # no member gives class 3 of row 0 any probability
        logits[2, 1, :-1] = -math.inf  # member 2 puts everything on the last class of row 1
    elif case == "tiny-probabilities":
        logits[:, :, 0] = -300.0  # log-probabilities far below float32's smallest number: exact only in two rounds
    elif case == "rows-3d":
        logits = torch.randn(5, 3, 4, 11)
    elif case == "bf16":
        logits = logits.to(torch.bfloat16)
    elif case == "non-contiguous":
        logits = torch.randn(6, 11, 5).permute(2, 0, 1)
    elif case == "empty-batch":
        logits = torch.randn(5, 0, 11)
    elif case == "one-class":
        logits = torch.randn(5, 6, 1)
    elif case == "large-k":
        logits = torch.randn(5, 2, 128_000)
    reference = expected(logits.float() if case == "bf16" else logits, reduction)
    for ranks in (2, 3):
        assert_matches(simulated(logits, ranks, reduction), reference)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ranks", [2, 3, 5])
def test_non_finite_rows_and_ties_give_the_single_process_result(reduction, ranks):
    logits = awkward_logits()
    got, want = simulated(logits, ranks, reduction), ensemble_reduce(logits, reduction)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan())
    if reduction == "vote":
        assert torch.equal(got.nan_to_num(), want.nan_to_num())  # bit for bit, ties to the lowest class included
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_vote_ties_across_ranks_go_to_the_lowest_class():
    logits = torch.zeros(4, 2, 5)
    logits[:2, 0, 3] = 1.0  # rank 0 of 2 votes class 3 twice
    logits[2:, 0, 1] = 1.0  # rank 1 votes class 1 twice: a tie the sum of counts decides
    logits[:, 1, [2, 4]] = 1.0  # every member's own argmax is a tie: its first index, class 2
    got = simulated(logits, 2, "vote")
    assert got.tolist() == [[0.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]]
    assert torch.equal(got, ensemble_reduce(logits, "vote"))


@pytest.mark.parametrize("ranks", [2, 3])
def test_stats_of_non_finite_rows_give_the_single_process_result(ranks):
    logits = awkward_logits()
    total = sum(stats_statistics(logits[b.start:b.stop]) for b in member_blocks(logits.shape[0], ranks))
    got, want = finish_stats(total, logits.shape[0]), ensemble_stats(logits)
    assert torch.equal(got.prediction, want.prediction)
    for field in want._fields:
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=1e-5, atol=1e-6, equal_nan=True)
    assert (got.mutual_info[~got.mutual_info.isnan()] >= 0).all()


def test_log_mean_probs_stays_exact_where_summed_probabilities_underflow():
    logits = torch.randn(6, 4, 5)
    logits[:, :, 0] = -300.0
    got = simulated(logits, 3, "log_mean_probs")
    assert torch.isfinite(got).all() and (got[:, 0] < -250).all()
    assert torch.isinf(torch.log(simulated(logits, 3, "mean_probs")[:, 0])).all()  # the naive way loses them


@pytest.mark.parametrize("members, ranks", SPLITS)
def test_stats_of_simulated_ranks_combine_to_the_reference(members, ranks):
    logits = torch.randn(members, 10, 7) * 2
    logits[:, 0] = logits[0, 0].clone()  # a row where every member agrees: disagreement 0, mutual information 0
    total = sum(stats_statistics(logits[b.start:b.stop]) for b in member_blocks(members, ranks))
    got, want = finish_stats(total, members), stats_reference(logits.double())
    for field in want._fields:
        if field == "prediction":
            assert torch.equal(got.prediction, want.prediction)
        else:
            torch.testing.assert_close(getattr(got, field), getattr(want, field).float(), rtol=1e-5, atol=1e-6)


def test_reduce_sharded_takes_the_all_reduce_as_an_argument():
    logits = torch.randn(4, 3, 5)
    calls = []

    def one_rank(tensor, op):
        calls.append((op, tuple(tensor.shape)))
        return tensor

    assert_matches(reduce_sharded(logits, "log_mean_probs", 4, one_rank), expected(logits, "log_mean_probs"))
    assert calls == [("max", (3, 5)), ("sum", (3, 5))]


def test_vote_counts_count_each_members_argmax_and_mark_rows_without_a_softmax():
    logits = torch.tensor([[[1.0, 3.0, 2.0], [0.0, 0.0, 0.0]],
                           [[5.0, 1.0, 1.0], [math.nan, 0.0, 0.0]],
                           [[0.0, 9.0, 0.0], [1.0, 1.0, 1.0]]])
    counts = vote_counts(logits)
    assert counts[0].tolist() == [1.0, 2.0, 0.0]
    assert torch.isnan(counts[1]).all()


def test_member_blocks_are_contiguous_and_balanced():
    assert member_blocks(5, 2) == [range(0, 3), range(3, 5)]
    assert member_blocks(5, 3) == [range(0, 2), range(2, 4), range(4, 5)]
    assert member_blocks(4, 3) == [range(0, 2), range(2, 3), range(3, 4)]
    assert member_blocks(8, 1) == [range(0, 8)]
    with pytest.raises(ValueError, match="3 members cannot be split over 4 member ranks"):
        member_blocks(3, 4)
    with pytest.raises(ValueError, match="parts must be a positive int"):
        member_blocks(3, 0)


def test_pairwise_disagreement_from_votes_equals_the_metric():
    member_probs = torch.randn(6, 20, 4).softmax(-1)
    member_probs[:, 0] = member_probs[0, 0].clone()
    votes = vote_counts(member_probs)
    torch.testing.assert_close(pairwise_disagreement_from_votes(votes, 6), metrics.pairwise_disagreement(member_probs))
    assert pairwise_disagreement_from_votes(votes[:1], 1).tolist() == [0.0]


def test_bytes_a_rank_sends_follow_the_ring_algorithms():
    assert CollectiveRecord("all_reduce", 4, 1000).sent_bytes == 1500
    assert CollectiveRecord("all_gather", 4, 1000).sent_bytes == 3000
    assert CollectiveRecord("all_reduce", 1, 1000).sent_bytes == 0
