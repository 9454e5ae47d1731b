"""Where one training step's time goes, member loop against FusedEnsemble (and vmap): torch.profiler over a few
steps of each (the steps of train_steps.py), operators grouped by kind, per step.

For the training target (fused at least 2x the fastest member loop at N=8, B=128; see docs/performance.md): the table
says which kinds of work the fused step does slower than N member steps (grouped convolutions forward or backward,
BatchNorm over N*C channels, the optimizer, layout copies). On CUDA the times are the device time of the kernels each
operator launched; on the CPU, operators' self CPU time.


    python bench/profile_train_step.py --members 8 --batch 128 --steps 5 \
        --json bench/results/<machine>/profile-train-<date>.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from fused_ensemble.cli.environment import environment_info
from fused_ensemble.cli.models import MODELS
from fused_ensemble.cli.workloads import settle_cpu_allocator

from train_steps import BUILDERS, build_members, member_batch, parse_implementations, training_call

# Operator kinds, first match wins (aten and our ops' names, lower case).
KINDS = (
    ("conv backward", ("convolution_backward", "convolutionbackward")),  # the op, and autograd's node for it
    ("conv forward", ("convolution", "conv2d", "conv1d", "conv3d")),
    ("batchnorm", ("batch_norm",)),
    ("optimizer", ("_foreach_", "_fused_sgd", "_fused_adam", "member_sgd", "member_adamw", "sgd")),
    ("matmul", ("mm", "addmm", "matmul", "linear")),
    ("loss", ("cross_entropy", "log_softmax", "nll_loss")),
    ("layout copies", ("copy_", "contiguous", "clone", "cat", "stack")),
)


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, needles in KINDS:
        if any(needle in lowered for needle in needles):
            return kind
    return "elementwise and other"


def profile_step(call, steps: int, device: str) -> dict:
    """Per-step wall ms (profiler off) and per-operator self time (profiler on) of ``call()``, one step."""
    for _ in range(3):  # warm-up: cuDNN autotuning, optimizer state, allocator
        call()
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        call()
    synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            call()
        synchronize()
    operators = []
    for event in prof.key_averages():
        # Operators (CPU-side events) only: on CUDA each one's self device time is that of the kernels it launched
        # itself. The kernels' own events (and GPU-side user annotations) would count the same time twice: the
        # first H100 run of this script summed both and reported 116 ms of work in a 62 ms step.
        if event.device_type != DeviceType.CPU:
            continue
        self_us = event.self_device_time_total if device == "cuda" else event.self_cpu_time_total
        if self_us > 0:
            operators.append({"name": event.key, "kind": kind_of(event.key), "calls_per_step": event.count / steps,
                              "self_ms_per_step": self_us / 1e3 / steps})
    operators.sort(key=lambda op: -op["self_ms_per_step"])
    kinds: dict[str, float] = defaultdict(float)
    for op in operators:
        kinds[op["kind"]] += op["self_ms_per_step"]
    return {"wall_ms_per_step": wall_ms, "profiled_ms_per_step": sum(kinds.values()),
            "kinds_ms_per_step": dict(sorted(kinds.items(), key=lambda item: -item[1])), "operators": operators,
            "convolutions_by_shape": convolutions_by_shape(prof, steps, device)}


def convolutions_by_shape(prof, steps: int, device: str) -> list[dict]:
    """Convolution operators per input shapes (one entry per layer shape): which layers a grouped convolution
    loses on against N dense ones, forward and backward."""
    rows = []
    for event in prof.key_averages(group_by_input_shape=True):
        if event.device_type != DeviceType.CPU or kind_of(event.key) not in ("conv forward", "conv backward"):
            continue
        self_us = event.self_device_time_total if device == "cuda" else event.self_cpu_time_total
        if self_us > 0:
            rows.append({"name": event.key, "input_shapes": [list(s) for s in event.input_shapes if s][:3],
                         "calls_per_step": event.count / steps, "self_ms_per_step": self_us / 1e3 / steps})
    rows.sort(key=lambda row: -row["self_ms_per_step"])
    return rows


def run(members: int, batch: int, steps: int, device: str, model: str, implementations: list[str],
        memory_format: torch.memory_format = torch.contiguous_format, autocast: bool = False) -> dict:
    settle_cpu_allocator(device)
    torch.backends.cudnn.benchmark = True
    x, y = member_batch(members, batch, device, model, memory_format=memory_format)
    result = {"environment": environment_info(device), "model": model, "members": members, "batch": batch,
              "memory_format": str(memory_format).replace("torch.", ""),
              "precision": "bf16 autocast" if autocast else "float32", "steps": steps,
              "time": "device time of launched kernels" if device == "cuda" else "self CPU time",
              "implementations": {}}
    for name in implementations:
        step = BUILDERS[name](build_members(members, device, model, memory_format=memory_format))
        result["implementations"][name] = profile_step(training_call(step, x, y, device, autocast), steps, device)
        del step
        if device == "cuda":
            torch.cuda.empty_cache()
    return result


def format_table(result: dict, top: int = 12) -> str:
    names = list(result["implementations"])
    rows = result["implementations"]
    lines = [f"{result['model']}: N={result['members']}, batch {result['batch']} per member, "
             f"{result['memory_format']}, {result['precision']}, {result['environment']['card']}; "
             f"ms per step ({result['time']})",
             f"{'':<28}" + "".join(f"{name:>12}" for name in names),
             f"{'wall (profiler off)':<28}" + "".join(f"{rows[n]['wall_ms_per_step']:>12.2f}" for n in names)]
    kinds = sorted({kind for n in names for kind in rows[n]["kinds_ms_per_step"]},
                   key=lambda kind: -max(rows[n]["kinds_ms_per_step"].get(kind, 0.0) for n in names))
    for kind in kinds:
        lines.append(f"{kind:<28}" + "".join(f"{rows[n]['kinds_ms_per_step'].get(kind, 0.0):>12.2f}" for n in names))
    for name in names:
        lines.append(f"\n{name}: top operators")
        for op in rows[name]["operators"][:top]:
            lines.append(f"  {op['self_ms_per_step']:>9.2f} ms  {op['calls_per_step']:>6.0f} calls  {op['name']}")
        lines.append(f"{name}: convolutions by input shapes")
        for op in rows[name]["convolutions_by_shape"][:top]:
            lines.append(f"  {op['self_ms_per_step']:>9.2f} ms  {op['calls_per_step']:>6.0f} calls  {op['name']} "
                         f"{op['input_shapes']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--batch", type=int, default=None, help="per member (default: 128 on CUDA, 2 on the CPU)")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps per implementation")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="resnet18-cifar", choices=sorted(MODELS))
    parser.add_argument("--implementations", default="loop,fused", help="comma-separated, of loop, vmap, fused")
    parser.add_argument("--channels-last", action="store_true", help="NHWC members and inputs (every implementation)")
    parser.add_argument("--bf16-autocast", action="store_true", help="under torch.autocast(bfloat16)")
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args(argv)
    implementations = parse_implementations(parser, args.implementations)
    batch = args.batch or (128 if args.device == "cuda" else 2)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    result = run(args.members, batch, args.steps, args.device, args.model, implementations, memory_format,
                 args.bf16_autocast)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
