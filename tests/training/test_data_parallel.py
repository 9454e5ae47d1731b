"""FusedEnsemble under DistributedDataParallel (gloo, two CPU processes): data-parallel training of the fused
ensemble, each rank on its share of every member's batch, equals one process on the whole batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fused_ensemble import FusedEnsemble, member_cross_entropy, optim
from fused_ensemble.cli.models import small_cnn

WORLD = 2
STEPS = 3
LR = [0.1, 0.05, 0.01]


def make_fused() -> FusedEnsemble:
    torch.manual_seed(0)
    return FusedEnsemble([small_cnn() for _ in range(3)], reduction="none", member_inputs=True).train()


def batches():
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(3, 8, 1, 8, 8, generator=generator), torch.randint(0, 10, (3, 8), generator=generator))
            for _ in range(STEPS)]


def train_rank(rank: int, port: int, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        model = torch.nn.parallel.DistributedDataParallel(make_fused())
        optimizer = optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=1e-3)
        share = slice(rank * 8 // WORLD, (rank + 1) * 8 // WORLD)
        for x, y in batches():
            optimizer.zero_grad()
            member_cross_entropy(model(x[:, share]), y[:, share]).backward()
            optimizer.step()
        if rank == 0:
            torch.save(dict(model.module.named_parameters()), result_path)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_ddp_training_equals_one_process_on_the_whole_batch(tmp_path):
    result_path = str(tmp_path / "rank0.pt")
    mp.spawn(train_rank, args=(free_port(), result_path), nprocs=WORLD)

    reference = make_fused()
    optimizer = optim.SGD(reference.parameters(), lr=LR, momentum=0.9, weight_decay=1e-3)
    for x, y in batches():
        optimizer.zero_grad()
        # DDP averages the ranks' gradients; each rank's BatchNorm normalizes its own share of the batch.
        shares = [slice(rank * 8 // WORLD, (rank + 1) * 8 // WORLD) for rank in range(WORLD)]
        (sum(member_cross_entropy(reference(x[:, s]), y[:, s]) for s in shares) / WORLD).backward()
        optimizer.step()
    trained = torch.load(result_path, weights_only=True)
    for name, parameter in reference.named_parameters():
        torch.testing.assert_close(trained[name], parameter.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.equal(trained["stacked.0.weight"], make_fused().stacked[0].weight.detach())
