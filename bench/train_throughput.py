"""Training throughput, member loop vs torch.func vmap vs FusedEnsemble, with the three steps taking turns.

The steps of train_steps.py (forward, backward, SGD step of CIFAR ResNet-18 members) are timed in interleaved
rounds (``fused_ensemble.benchmarking.interleaved_times``): on a shared CPU whose speed drifts by several percent
over a minute, timing each implementation in a block of its own (as pytest-benchmark does in
test_bench_train.py) moved the fused-vs-loop ratio between 0.94x and 1.09x from run to run; in turns, drift
shifts all three alike.

    python bench/train_throughput.py --members 4 8 16 [--channels-last] [--bf16-autocast] --json PATH
    python bench/train_throughput.py --members 8 --formats channels_last --precisions bf16 \
        --implementations loop,fused,fused_compile,fused_member_backward
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from fused_ensemble.cli.environment import environment_info
from fused_ensemble.cli.models import MODELS
from fused_ensemble.cli.workloads import settle_cpu_allocator
from fused_ensemble.inference.timing import interleaved_times, median

from train_steps import BUILDERS, IMPLEMENTATIONS, build_members, member_batch, parse_implementations, training_call

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
PRECISIONS = {"float32": False, "bf16": True}  # name -> under bf16 autocast


def measure(members: int, batch: int, device: str, rounds: int, min_reps: int,
            memory_format: torch.memory_format = torch.contiguous_format, autocast: bool = False,
            implementations: tuple[str, ...] = IMPLEMENTATIONS, model: str = "resnet18-cifar") -> dict:
    torch.manual_seed(1)
    x, y = member_batch(members, batch, device, model, memory_format=memory_format)
    steps, unsupported = {}, {}
    for name in implementations:
        call = training_call(BUILDERS[name](build_members(members, device, model, memory_format=memory_format)), x, y,
                             device, autocast)
        steps[name] = (lambda call=call: (call(), torch.cuda.synchronize())) if device == "cuda" else call
        try:  # warm-up: optimizer state, cuDNN autotuning, allocator
            for _ in range(2):
                steps[name]()
        except RuntimeError as error:
            # torch.vmap of cuDNN BatchNorm on channels_last inputs raises "NYI: querying is_contiguous inside of
            # vmap" (torch 2.11, CUDA): that point has no vmap time, the others still run.
            unsupported[name] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
            del steps[name]
    # time_ms (inside interleaved_times) runs under no_grad: training_call turns autograd back on.
    times = interleaved_times(steps, device, min_reps, budget_ms=0.0, rounds=rounds)
    ms = {name: median(t) for name, t in times.items()}
    ratio = {f"{ours}_vs_{name}": ms[name] / ms[ours] if name in ms and ours in ms else None
             for ours in ("fused", "fused_compile", "fused_member_backward") for name in ("loop", "vmap")
             if ours == "fused" or ours in implementations}
    return {"members": members, "batch_per_member": batch, "memory_format": str(memory_format).replace("torch.", ""),
            "precision": "bf16 autocast" if autocast else "float32", "ms": ms, "times_ms": times, **ratio,
            "unsupported": unsupported,
            "member_images_per_s": {name: members * batch * 1e3 / t for name, t in ms.items()}}


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
    parser.add_argument("--formats", nargs="+", choices=sorted(FORMATS), default=None,
                        help="memory formats to time (default: contiguous, plus channels_last with --channels-last)")
    parser.add_argument("--precisions", nargs="+", choices=sorted(PRECISIONS), default=None,
                        help="precisions to time (default: float32, plus bf16 with --bf16-autocast)")
    parser.add_argument("--implementations", default=",".join(IMPLEMENTATIONS),
                        help=f"comma-separated, of {', '.join(BUILDERS)} (default: {','.join(IMPLEMENTATIONS)})")
    parser.add_argument("--model", default="resnet18-cifar", choices=sorted(MODELS))
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args(argv)
    implementations = parse_implementations(parser, args.implementations)
    settle_cpu_allocator(args.device)
    torch.backends.cudnn.benchmark = True
    batch = args.batch or (128 if args.device == "cuda" else 2)
    result = {"environment": environment_info(args.device), "model": args.model, "rounds": args.rounds,
              "points": []}
    formats = ([FORMATS[name] for name in args.formats] if args.formats else
               [torch.contiguous_format] + ([torch.channels_last] if args.channels_last else []))
    precisions = ([PRECISIONS[name] for name in args.precisions] if args.precisions else
                  [False] + ([True] if args.bf16_autocast else []))
    width = max(14, *(len(name) + 2 for name in implementations))  # one column per implementation
    print(f"{'N':>3} {'B':>4} {'layout':>18} {'precision':>14} " +
          "".join(f"{name:>{width}}" for name in implementations) + "  fused vs loop")
    for members in args.members:
        for memory_format in formats:
            for autocast in precisions:
                point = measure(members, batch, args.device, args.rounds, args.reps, memory_format, autocast,
                                implementations, args.model)
                result["points"].append(point)
                print(f"{members:>3} {batch:>4} {point['memory_format']:>18} {point['precision']:>14} " +
                      "".join(f"{point['ms'][name]:>{width}.1f}" if name in point["ms"] else f"{'n/a':>{width}}"
                              for name in implementations) +
                      (f"  {point['fused_vs_loop']:>12.3f}x" if point["fused_vs_loop"] else ""), flush=True)
                for name, error in point["unsupported"].items():
                    print(f"    {name}: {error}", flush=True)
        if args.json:  # after every point: a cut-short run keeps what it measured
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
