"""``python -m fused_ensemble bench``: the member loop, ``torch.func`` vmap and ``FusedEnsemble`` (and, when asked,
``optimize()`` and compiled variants) timed on one workload, each checked against the loop first."""

from __future__ import annotations

import argparse
import json

import torch

from fused_ensemble.cli.environment import environment_info
from fused_ensemble.cli.models import MODELS
from fused_ensemble.cli.workloads import Workload, best_device, parse_dtype, relative_error
from fused_ensemble.inference.timing import interleaved_times, median

METHODS = ("loop", "vmap", "fused")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="resnet18-cifar", choices=sorted(MODELS))
    parser.add_argument("--members", type=int, default=8, help="number of ensemble members N")
    parser.add_argument("--batch", type=int, default=64, help="batch size B (every member sees the same batch)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--reduction", default="mean_probs")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed calls per method, at least (default: 3 on CPU, 50 on GPU; fast calls get about "
                             "0.5 s of calls, and the methods take turns in 5 rounds)")
    parser.add_argument("--optimize", action="store_true",
                        help="also time FusedEnsemble.optimize(x) (tunes every convolution first: slow on CPU)")
    parser.add_argument("--optimize-compile", action="store_true",
                        help="also time FusedEnsemble.optimize(x, compile=True) (compiles each candidate: slow)")
    parser.add_argument("--compile-vmap", action="store_true",
                        help="also time torch.compile of the vmap baseline (compiles first: tens of seconds)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON to PATH")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_bench(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    device = args.device or best_device()
    dtype = parse_dtype(args.dtype)
    reps = args.reps or (50 if device.startswith("cuda") else 3)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    methods = (METHODS + (("vmap_compile",) if args.compile_vmap else ()) + (("optimized",) if args.optimize else ())
               + (("optimized_compile",) if args.optimize_compile else ()))
    stages = tqdm(total=1 + 2 * len(methods), desc="bench", disable=args.no_progress, leave=False)
    stages.set_postfix_str("building members")
    workload = Workload.build(args.model, args.members, args.batch, device, dtype, args.reduction)
    runners = {"loop": workload.loop(), "vmap": workload.vmap(), "fused": workload.fused()}
    if args.compile_vmap:
        runners["vmap_compile"] = workload.vmap_compiled()  # compiled by its check call below
    if args.optimize:
        stages.set_postfix_str("optimizing")
        runners["optimized"] = workload.optimized()
    if args.optimize_compile:
        stages.set_postfix_str("optimizing with torch.compile")
        runners["optimized_compile"] = workload.optimized(compile=True)
    stages.update()
    outputs = {}
    with torch.no_grad():
        for name, run in runners.items():
            stages.set_postfix_str(f"checking {name}")
            outputs[name] = run()
            stages.update()
    errors = {name: relative_error(outputs[name], outputs["loop"]) for name in methods}
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    for name in methods[1:]:
        if errors[name] > tolerance:
            raise RuntimeError(f"{name} output differs from the member loop: relative error {errors[name]:.2e} "
                               f"> {tolerance:.0e}")
    stages.set_postfix_str("timing every method, interleaved")
    timings = interleaved_times(runners, device, reps)
    stages.update(len(runners))
    stages.close()
    rows = {}
    for name in methods:
        ms = median(timings[name])
        rows[name] = {"ms": ms, "images_per_s": args.batch * 1e3 / ms,
                      "speedup_vs_loop": median(timings["loop"]) / ms,
                      "speedup_vs_vmap": median(timings["vmap"]) / ms,
                      "relative_error_vs_loop": errors[name], "times_ms": timings[name]}
    return {"model": args.model, "members": args.members, "batch": args.batch, "device": device,
            "dtype": str(dtype).replace("torch.", ""), "reduction": args.reduction, "reps": reps,
            "environment": environment_info(device), "results": rows}


def format_table(result: dict) -> str:
    lines = [f"{result['model']}: N={result['members']} members, batch {result['batch']}, {result['dtype']}, "
             f"{result['environment']['card']}, median of >= {result['reps']} calls in 5 interleaved rounds",
             f"{'method':<18} {'ms':>10} {'images/s':>10} {'vs loop':>8} {'vs vmap':>8} {'rel err':>9}"]
    for name, row in result["results"].items():
        lines.append(f"{name:<18} {row['ms']:>10.2f} {row['images_per_s']:>10.1f} {row['speedup_vs_loop']:>7.2f}x "
                     f"{row['speedup_vs_vmap']:>7.2f}x {row['relative_error_vs_loop']:>9.1e}")
    return "\n".join(lines)


def main_bench(args: argparse.Namespace) -> int:
    result = run_bench(args)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
