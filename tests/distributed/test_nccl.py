"""ShardedEnsemble over NCCL with the members on GPUs: one process per GPU (one process on a single-GPU machine, two
where there are two GPUs), against one process's FusedEnsemble on the GPU."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from sharded_workers import REDUCTIONS, build_cnn, nccl_worker, recorded, run_ranks

from fused_ensemble.distributed import load

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not dist.is_available() or not dist.is_nccl_available(), reason="needs NCCL")]


def test_nccl_ranks_equal_one_process_on_the_gpu(tmp_path):
    world = min(torch.cuda.device_count(), 2)
    run_ranks(nccl_worker, world, str(tmp_path), str(tmp_path / "checkpoint"), backend="nccl")
    outcomes = recorded(tmp_path, world)
    for check in [f"forward {r}" for r in (*REDUCTIONS, "none")] + ["stats", "save"]:
        failures = [outcome for outcome in outcomes[check] if outcome != "ok"]
        assert not failures, failures[0]
    fused = load(str(tmp_path / "checkpoint"), build_cnn)
    for name, tensor in fused.state_dict().items():
        assert tensor.device.type == "cpu", name
