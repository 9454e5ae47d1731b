"""Per-member batch streams: every member its own shuffle or bootstrap resample."""

import pytest
import torch

from fused_ensemble.training import batches


@pytest.mark.parametrize("sampling", batches.SAMPLINGS)
def test_member_batches_shapes_and_determinism(sampling):
    x = torch.arange(50, dtype=torch.float32).view(50, 1, 1, 1).expand(50, 1, 2, 2)
    y = torch.arange(50)

    def epoch(seed):
        return list(batches.member_batches(x, y, num_members=3, batch_size=16, sampling=sampling,
                                        generator=torch.Generator().manual_seed(seed)))

    drawn = epoch(7)
    assert len(drawn) == 3  # 50 // 16, last partial batch dropped
    for xb, yb in drawn:
        assert xb.shape == (3, 16, 1, 2, 2) and yb.shape == (3, 16)
        assert torch.equal(xb[:, :, 0, 0, 0].long(), yb)  # images travel with their labels
    again = epoch(7)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(drawn, again))
    other = epoch(8)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(drawn, other))
    labels = torch.cat([yb for _, yb in drawn], dim=1)  # [3, 48]
    assert not torch.equal(labels[0], labels[1])  # members draw their own orders
    if sampling == "shuffle":
        for member in labels:
            assert len(set(member.tolist())) == 48  # no repeats within an epoch


def test_bootstrap_repeats_examples_and_full_epochs_cover_everything_when_shuffled():
    gen = torch.Generator().manual_seed(0)
    boot = torch.cat(list(batches.member_index_batches(1000, 2, 1000, "bootstrap", gen)), dim=1)
    # about 1 - 1/e = 63% distinct examples in a bootstrap sample
    for member in boot:
        assert 0.58 < len(set(member.tolist())) / 1000 < 0.68
    full = torch.cat(list(batches.member_index_batches(10, 2, 4, "shuffle", gen, drop_last=False)), dim=1)
    assert [sorted(m.tolist()) for m in full] == [list(range(10))] * 2


def test_member_batches_errors():
    with pytest.raises(ValueError, match="unknown sampling 'bagging'"):
        next(batches.member_index_batches(10, 2, 4, "bagging"))
    with pytest.raises(ValueError, match="batch_size=16 is larger than the 10 examples"):
        next(batches.member_index_batches(10, 2, 16))
