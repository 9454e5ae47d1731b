"""Training throughput, member loop vs torch.func vmap vs FusedEnsemble, with the three steps taking turns.

The steps of train_steps.py (forward, backward, SGD step of CIFAR ResNet-18 members) are timed in interleaved
rounds (``fused_ensemble.benchmarking.interleaved_times``): on a shared CPU whose speed drifts by several percent
over a minute, timing each implementation in a block of its own (as pytest-benchmark does in
test_bench_train.py) moved the fused-vs-loop ratio between 0.94x and 1.09x from run to run; in turns, drift
shifts all three alike.

    python bench/train_throughput.py --members 4 8 16 [--channels-last] [--bf16-autocast] --json PATH
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from fused_ensemble.bench_cli import _environment
from fused_ensemble.benchmarking import interleaved_times, median, settle_cpu_allocator
from train_steps import BUILDERS, IMPLEMENTATIONS, build_members


def measure(members: int, batch: int, device: str, rounds: int, min_reps: int,
            memory_format: torch.memory_format = torch.contiguous_format, autocast: bool = False) -> dict:
    torch.manual_seed(1)
    x = torch.randn(members, batch, 3, 32, 32, device=device)
    if memory_format == torch.channels_last:  # every member's [B, C, H, W] slice NHWC
        x = x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    y = torch.randint(0, 10, (members, batch), device=device)
    steps = {}
    for name in IMPLEMENTATIONS:
        step = BUILDERS[name](build_members(members, device, memory_format=memory_format))
        if device == "cuda":
            steps[name] = lambda step=step: (step(x, y), torch.cuda.synchronize())
        else:
            steps[name] = lambda step=step: step(x, y)
    for step in steps.values():  # warm-up: optimizer state, cuDNN autotuning, allocator
        for _ in range(2):
            step()
    # time_ms (inside interleaved_times) runs under no_grad: the steps turn autograd back on themselves.
    times = interleaved_times({name: _with_grad(step, device, autocast) for name, step in steps.items()}, device,
                              min_reps, budget_ms=0.0, rounds=rounds)
    ms = {name: median(t) for name, t in times.items()}
    return {"members": members, "batch_per_member": batch, "memory_format": str(memory_format).replace("torch.", ""),
            "precision": "bf16 autocast" if autocast else "float32", "ms": ms, "times_ms": times,
            "fused_vs_loop": ms["loop"] / ms["fused"], "fused_vs_vmap": ms["vmap"] / ms["fused"],
            "member_images_per_s": {name: members * batch * 1e3 / t for name, t in ms.items()}}


def _with_grad(step, device: str, autocast: bool):
    def run():
        with torch.enable_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            step()
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--batch", type=int, default=None, help="per member (default: 128 on CUDA, 2 on the CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--reps", type=int, default=20, help="timed steps per implementation, over all rounds")
    parser.add_argument("--channels-last", action="store_true",
                        help="also time every point with NHWC members and inputs (loop, vmap and fused alike)")
    parser.add_argument("--bf16-autocast", action="store_true",
                        help="also time every point under torch.autocast(bfloat16) (loop, vmap and fused alike)")
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args(argv)
    settle_cpu_allocator(args.device)
    torch.backends.cudnn.benchmark = True
    batch = args.batch or (128 if args.device == "cuda" else 2)
    result = {"environment": _environment(args.device), "model": "resnet18-cifar", "rounds": args.rounds,
              "points": []}
    formats = [torch.contiguous_format] + ([torch.channels_last] if args.channels_last else [])
    precisions = [False] + ([True] if args.bf16_autocast else [])
    print(f"{'N':>3} {'B':>4} {'layout':>18} {'precision':>14} " + "".join(f"{name:>10}" for name in IMPLEMENTATIONS)
          + "  fused vs loop")
    for members in args.members:
        for memory_format in formats:
            for autocast in precisions:
                point = measure(members, batch, args.device, args.rounds, args.reps, memory_format, autocast)
                result["points"].append(point)
                print(f"{members:>3} {batch:>4} {point['memory_format']:>18} {point['precision']:>14} " +
                      "".join(f"{point['ms'][name]:>10.1f}" for name in IMPLEMENTATIONS) +
                      f"  {point['fused_vs_loop']:>12.3f}x", flush=True)
        if args.json:  # after every point: a cut-short run keeps what it measured
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
