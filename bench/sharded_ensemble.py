"""A sharded ensemble on this CPU: one forward and one training step versus the number of processes, and the bytes each
rank sends per forward and per step, against gathering the member logits (and against data parallelism of the whole
ensemble), as a function of N, B and K, with an estimate for 8 GPUs from published NCCL bus bandwidths.

Every process runs one thread, in a gloo group started here (torch.multiprocessing); the single-process points are a
FusedEnsemble of all members in this process, with no group, one thread and torch's default threads (every core). A
forward ends in an all-reduce and a training step in FailTogether's flag (members only, no gradient crosses the
member dimension): each is started on every rank after a barrier, and per repetition the slowest rank's time counts.
The bytes are computed from the collectives' sizes (``bytes_formula``) and checked against what the code sends
(``fused_ensemble.distributed.CollectiveLog`` around one call of each): a mismatch stops the run. ``bench/report.py``
makes the Performance page's "Scaling out" tables from the file.

    python bench/sharded_ensemble.py --json bench/results/cpu-2core/sharded-<date>.json
    python bench/sharded_ensemble.py --bytes-only --json bench/results/cpu-2core/sharded-bytes-<date>.json
    python bench/sharded_ensemble.py --smoke --json /tmp/sharded.json     # seconds: tiny sizes, a check
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fused_ensemble import FusedEnsemble
from fused_ensemble.cli.environment import environment_info
from fused_ensemble.cli.models import small_cnn
from fused_ensemble.distributed import CollectiveLog, FailTogether, ShardedEnsemble, member_blocks
from fused_ensemble.training.loop import train_step
from fused_ensemble.training.optim import SGD

# Two processes at most by default: the machine the CPU results come from has two cores, one per process.
FULL = dict(members=8, batch=64, classes=10, image=8, processes=[1, 2], warmup=5, reps=40)
SMOKE = dict(members=4, batch=8, classes=10, image=8, processes=[1, 2], warmup=1, reps=3)
FLOAT_BYTES = 4
TIMEOUT = datetime.timedelta(minutes=5)

# Published NCCL figures the 8-GPU estimate uses. busbw is nccl-tests' bus bandwidth: for an all-reduce of S bytes
# over n ranks, time = S * 2(n-1)/n / busbw; for an all-gather of S bytes per rank, time = S * (n-1) / busbw. These are
# peaks at large sizes (hundreds of MB and more): the kilobytes to megabytes a sharded forward sends reach less, so
# every estimate also adds a fixed time per collective.
NCCL_FIGURES = {
    "busbw_definition": "https://github.com/NVIDIA/nccl-tests/blob/master/doc/PERFORMANCE.md",
    "busbw_GB_per_s": {
        "8x H100 SXM (NVLink 4, NVSwitch)": {"all_reduce": 480, "all_gather": 370},
        "8x H100 PCIe (no NVSwitch)": {"all_reduce": 35, "all_gather": 35},
    },
    "busbw_sources": {
        "8x H100 SXM (NVLink 4, NVSwitch)": (
            "https://github.com/NVIDIA/nccl-tests/issues/212 (an NCCL maintainer: about 480 GB/s peak all-reduce busbw "
            "on 8 H100 with NVLink SHARP, and about 370 GB/s for the other collectives: the effective NVLink "
            "bandwidth, the 450 GB/s line rate less the protocol's overhead)"),
        "8x H100 PCIe (no NVSwitch)": (
            "https://docs.alayanew.com/en/docs/tech-blog/2026-05-06-nccl-tests (a cloud provider's reference table "
            "of nccl-tests all_reduce_perf: 35-45 GB/s busbw at large sizes; the low end is used)"),
    },
    "small_message_latency_us": 15,
    "latency_note": ("an assumed fixed time per collective on one node, not measured here: small messages do not "
                     "reach the peak bandwidths, and a launch plus a synchronization costs microseconds"),
}


def bytes_formula(members: int, batch: int, classes: int, processes: int, member_parameters: int) -> dict:
    """Payload bytes per rank and call (the tensor each rank contributes) and bytes each rank sends under the ring
    algorithms, per sharded forward of each reduction, per training step, and for the alternatives."""
    largest = max(len(block) for block in member_blocks(members, processes))
    result_bytes = batch * classes * FLOAT_BYTES
    reduce_factor = 2 * (processes - 1) / processes
    payload = {
        "forward_mean_probs": result_bytes,  # one all-reduce of [B, K]
        "forward_log_mean_probs": 2 * result_bytes,  # the maxima, then the shifted sums
        "forward_vote": result_bytes,  # the vote counts
        "forward_stats": batch * (2 * classes + 1) * FLOAT_BYTES,
        "forward_gather_logits": largest * batch * classes * FLOAT_BYTES,  # reduction="none": one all-gather
        "train_step_members_only": processes * 4,  # FailTogether's int32 flag per rank (a side channel)
        "train_step_data_parallel_whole_ensemble": members * member_parameters * FLOAT_BYTES,
    }
    sent = {name: (value * (processes - 1) if name == "forward_gather_logits" else value * reduce_factor)
            for name, value in payload.items()}
    return {"payload_bytes": payload, "sent_bytes": sent}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _build(index: int, classes: int) -> torch.nn.Module:
    torch.manual_seed(index)
    return small_cnn(1, classes)


def _timed(call, config: dict) -> list[float]:
    """ms of each of ``config["reps"]`` calls after ``config["warmup"]`` untimed ones, every call started together on
    every rank (a barrier), then per repetition the slowest rank's time; empty when the run is not timed."""
    if not config["reps"]:
        return []
    times = []
    for rep in range(config["warmup"] + config["reps"]):
        dist.barrier()
        start = time.perf_counter()
        call()
        if rep >= config["warmup"]:
            times.append((time.perf_counter() - start) * 1e3)
    slowest = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return slowest.tolist()


def _rank(rank: int, world: int, port: int, config: dict, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=TIMEOUT)
    try:
        n, batch, classes, image = config["members"], config["batch"], config["classes"], config["image"]

        def build(index):
            return _build(index, classes)

        x = torch.randn(batch, 1, image, image, generator=torch.Generator().manual_seed(0))
        logged = {}
        with torch.no_grad():
            for reduction in ("mean_probs", "log_mean_probs", "vote", "none"):
                sharded = ShardedEnsemble(build, n, reduction=reduction).eval()
                with CollectiveLog() as log:
                    sharded(x)
                logged["forward_gather_logits" if reduction == "none" else f"forward_{reduction}"] = log
            sharded = ShardedEnsemble(build, n, reduction="mean_probs").eval()
            with CollectiveLog() as log:
                sharded.stats(x)
            logged["forward_stats"] = log
            forward_ms = _timed(lambda: sharded(x), config)

        trained = ShardedEnsemble(build, n, member_inputs=True).train()
        optimizer = trained.optimizer(SGD, lr=0.05, momentum=0.9)
        guard = FailTogether(timeout=TIMEOUT)
        local = len(trained.member_indices)
        xb = torch.randn(local, batch, 1, image, image, generator=torch.Generator().manual_seed(1 + rank))
        yb = torch.randint(0, classes, (local, batch), generator=torch.Generator().manual_seed(2 + rank))

        def step():
            with guard:
                train_step(trained.local, optimizer, xb, yb)

        with CollectiveLog() as log:
            step()
        logged["train_step_members_only"] = log
        step_ms = _timed(step, config)
        if rank == 0:
            member_parameters = sum(p.numel() for p in build(0).parameters())
            formula = bytes_formula(n, batch, classes, world, member_parameters)
            counted = {name: {"payload_bytes": log.payload_bytes, "sent_bytes": log.sent_bytes,
                              "collectives": len(log.records)} for name, log in logged.items()}
            for name, entry in counted.items():
                if entry["payload_bytes"] != formula["payload_bytes"][name]:
                    raise AssertionError(f"{name}: the code sent {entry['payload_bytes']} bytes, the formula says "
                                         f"{formula['payload_bytes'][name]}")
            point = {"processes": world, "group": True, "threads": 1,
                     "member_blocks": [len(block) for block in trained.blocks],
                     "bytes_counted": counted, "bytes_formula": formula}
            if forward_ms:
                point.update(forward_ms=statistics.median(forward_ms), train_step_ms=statistics.median(step_ms),
                             forward_ms_all=forward_ms, train_step_ms_all=step_ms)
            Path(out).write_text(json.dumps(point))
    finally:
        dist.destroy_process_group()


def one_process(config: dict, threads: int) -> dict:
    """A FusedEnsemble of every member in this process with ``threads`` threads, no process group: the same forward
    and training step as the ranks run."""
    torch.set_num_threads(threads)
    n, batch, classes, image = config["members"], config["batch"], config["classes"], config["image"]
    x = torch.randn(batch, 1, image, image, generator=torch.Generator().manual_seed(0))
    fused = FusedEnsemble([_build(i, classes) for i in range(n)], reduction="mean_probs").eval()
    trained = FusedEnsemble([_build(i, classes) for i in range(n)], reduction="none", member_inputs=True).train()
    optimizer = SGD(trained.parameters(), lr=0.05, momentum=0.9)
    xb = torch.randn(n, batch, 1, image, image, generator=torch.Generator().manual_seed(1))
    yb = torch.randint(0, classes, (n, batch), generator=torch.Generator().manual_seed(2))

    def repeat(call) -> list[float]:
        times = []
        for rep in range(config["warmup"] + config["reps"]):
            start = time.perf_counter()
            call()
            if rep >= config["warmup"]:
                times.append((time.perf_counter() - start) * 1e3)
        return times

    with torch.no_grad():
        forward_ms = repeat(lambda: fused(x))
    step_ms = repeat(lambda: train_step(trained, optimizer, xb, yb))
    return {"processes": 1, "group": False, "threads": torch.get_num_threads(), "member_blocks": [n],
            "forward_ms": statistics.median(forward_ms), "train_step_ms": statistics.median(step_ms),
            "forward_ms_all": forward_ms, "train_step_ms_all": step_ms}


def bytes_versus_size(processes: int = 8) -> list[dict]:
    """Bytes each of ``processes`` ranks sends per forward (mean_probs) sharded and gathering logits, per N, B, K."""
    rows = []
    for members in (8, 64):
        for batch in (32, 256):
            for classes in (10, 1000, 32000):
                sent = bytes_formula(members, batch, classes, processes, 0)["sent_bytes"]
                rows.append({"processes": processes, "members": members, "batch": batch, "classes": classes,
                             "sharded_bytes": sent["forward_mean_probs"],
                             "gather_logits_bytes": sent["forward_gather_logits"],
                             "ratio": sent["forward_gather_logits"] / sent["forward_mean_probs"]})
    return rows


# What each quantity of ``bytes_formula`` is on the wire: the collective and how many calls.
COLLECTIVES = {"forward_mean_probs": ("all_reduce", 1), "forward_log_mean_probs": ("all_reduce", 2),
               "forward_vote": ("all_reduce", 1),
               "forward_stats": ("all_reduce", 1), "forward_gather_logits": ("all_gather", 1),
               "train_step_members_only": ("all_reduce", 1),
               "train_step_data_parallel_whole_ensemble": ("all_reduce", 1)}


def estimate_8_gpus() -> list[dict]:
    """Communication time per forward and per data-parallel training step on one node of 8 GPUs, from NCCL_FIGURES:
    the fixed time per collective plus the bytes each rank sends over the bus bandwidth of that collective. The
    members are too many for one GPU (64 ResNet-50 hold 6.5 GB of float32 parameters, four times that with gradients
    and Adam's state). A sharded training step sends no gradient: only FailTogether's flag, over gloo on the host."""
    import torchvision

    resnet50 = sum(p.numel() for p in torchvision.models.resnet50(weights=None).parameters())
    latency_ms = NCCL_FIGURES["small_message_latency_us"] / 1e3
    rows = []
    for what, members, batch, classes, parameters in (
            ("64 ResNet-50, ImageNet head", 64, 256, 1000, resnet50),
            ("64 ResNet-50 bodies with a 32k-class head", 64, 64, 32000, resnet50)):
        sent = bytes_formula(members, batch, classes, 8, parameters)["sent_bytes"]
        for fabric, busbw in NCCL_FIGURES["busbw_GB_per_s"].items():
            def ms(name):
                kind, calls = COLLECTIVES[name]
                return calls * latency_ms + sent[name] / (busbw[kind] * 1e9) * 1e3

            rows.append({"workload": what, "fabric": fabric, "members": members, "batch": batch, "classes": classes,
                         "member_parameters": parameters,
                         "forward_sharded_ms": ms("forward_mean_probs"),
                         "forward_log_mean_probs_ms": ms("forward_log_mean_probs"),
                         "forward_gather_logits_ms": ms("forward_gather_logits"),
                         "train_step_data_parallel_ms": ms("train_step_data_parallel_whole_ensemble"),
                         "whole_ensemble_parameters_GB": members * parameters * FLOAT_BYTES / 1e9})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="write the results here")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and 3 repetitions (a check, not a benchmark)")
    parser.add_argument("--processes", type=int, nargs="+", default=None,
                        help=f"the group sizes to run (default: {FULL['processes']})")
    parser.add_argument("--bytes-only", action="store_true",
                        help="count and check the bytes each rank sends, time nothing (quick; any machine)")
    args = parser.parse_args(argv)
    config = dict(SMOKE if args.smoke else FULL)
    if args.processes:
        config["processes"] = args.processes
    if args.bytes_only:
        config.update(warmup=0, reps=0)
    all_threads = torch.get_num_threads()
    points = [] if args.bytes_only else [one_process(config, 1), one_process(config, all_threads)]
    torch.set_num_threads(all_threads)
    with tempfile.TemporaryDirectory() as folder:
        for world in config["processes"]:
            out = str(Path(folder, f"{world}.json"))
            mp.start_processes(_rank, args=(world, _free_port(), config, out), nprocs=world, start_method="spawn")
            points.append(json.loads(Path(out).read_text()))
            if "forward_ms" in points[-1]:
                print(f"{world} processes: forward {points[-1]['forward_ms']:.2f} ms, "
                      f"step {points[-1]['train_step_ms']:.2f} ms", file=sys.stderr)
    result = {
        "environment": environment_info("cpu"),
        "config": {**config, "model": "small_cnn (digits member)", "forward_reduction": "mean_probs",
                   "optimizer": "SGD", "timed": not args.bytes_only},
        "note": ("Times are medians over the repetitions of the slowest rank's time, one thread per process in a gloo "
                 "group. The bytes are per rank: payload is the tensor a rank contributes to each collective, sent "
                 "the ring algorithms' count; the counted bytes equal the formula's (the run stops otherwise)."),
        "points": points,
        "bytes_versus_size": bytes_versus_size(),
        "nccl_figures": NCCL_FIGURES,
        "estimate_8_gpus": estimate_8_gpus(),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
