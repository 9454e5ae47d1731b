"""Ensemble-throughput matrix: every way of running N members, on the same members and input, in one process.

Methods: the member loop, the loop replayed as a CUDA graph (GPU), torch.func vmap (and, with --compile-vmap,
torch.compile of it; a point where it does not compile records why), FusedEnsemble, its ``optimize()``d module
(and, with --optimize-compile, ``optimize(x, compile=True)``), and one member at batch N * B (the "ensemble
efficiency" reference: an ensemble can at best be as fast as one member seeing all N * B images, in whichever
memory format runs it faster; efficiency = t_single(N * B) / t_optimized).

    python bench/ensemble_throughput.py --preset gpu --json bench/results/h100/ensemble-<date>.json   # on a GPU
    python bench/ensemble_throughput.py --preset cpu --json bench/results/cpu-2core/ensemble-<date>.json

FLOPs are counted with torch.utils.flop_counter on one member at batch 1 (convolutions and matmuls, 2 per
multiply-add) and reported as N * B * flops / time, next to the rate of a large bf16 matmul measured in the same run.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
import traceback

import torch

from fused_ensemble import FusedEnsemble
from fused_ensemble.cli.environment import environment_info
from fused_ensemble.cli.models import build_model, input_shape
from fused_ensemble.cli.workloads import Workload, relative_error, settle_cpu_allocator
from fused_ensemble.inference.timing import interleaved_times, median, time_ms

# --compile-vmap compiles the same vmap lambda once per point: past dynamo's default of 8 recompiles per code object
# it would silently run eagerly, and "vmap_compile" would time eager (the gpu-full preset has 120 points).
torch._dynamo.config.cache_size_limit = 1024
torch._dynamo.config.accumulated_cache_size_limit = 1024

# (model, dtype, members, batch)
PRESETS = {
    "gpu": [("resnet18-cifar", "bfloat16", 8, 1), ("resnet18-cifar", "bfloat16", 16, 64),
            ("resnet18-cifar", "bfloat16", 16, 512), ("resnet18-cifar", "float32", 16, 512),
            ("resnet50", "bfloat16", 8, 64), ("resnet18-cifar", "bfloat16", 4, 64),
            ("resnet18-cifar", "bfloat16", 32, 64), ("resnet50", "bfloat16", 8, 1),
            ("lenet", "float32", 32, 512), ("mlp", "float32", 32, 512)],
    # torch.compile of vmap (--compile-vmap) compiles for a minute or so per point: two points.
    "gpu-compile": [("resnet18-cifar", "bfloat16", 8, 1), ("resnet18-cifar", "bfloat16", 16, 64)],
    "cpu": [("resnet18-cifar", "float32", 8, 1), ("resnet18-cifar", "float32", 4, 8),
            ("resnet18-cifar", "float32", 4, 32), ("lenet", "float32", 4, 64), ("lenet", "float32", 16, 64),
            ("mlp", "float32", 4, 64), ("mlp", "float32", 16, 64)],
    "smoke": [("lenet", "float32", 2, 4), ("mlp", "float32", 3, 4)],
}
# The whole matrix (4 models x N in {1, 4, 8, 16, 32} x B in {1, 64, 512} x fp32/bf16, 120 points): hours on a
# GPU; "gpu" above is the subset that fits a run of a few minutes.
PRESETS["gpu-full"] = [(model, dtype, members, batch) for model in ("resnet18-cifar", "resnet50", "lenet", "mlp")
                       for dtype in ("bfloat16", "float32") for members in (1, 4, 8, 16, 32)
                       for batch in (1, 64, 512)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def flops_per_sample(model: str) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    member = build_model(model).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        member(torch.randn(1, *input_shape(model)))
    return counter.get_total_flops()


def matmul_tflops(device: str) -> float | None:
    if device != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = median(time_ms(lambda: a @ b, device, 20, warmup=3))
    return 2 * 8192 ** 3 / ms / 1e9


def graphed(fn, device: str):
    """``fn`` captured once in a CUDA graph; the returned callable replays it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        fn()
    return graph.replay


def run_point(model: str, dtype_name: str, members: int, batch: int, device: str, reps: int,
              compile_vmap: bool = False, optimize_compile: bool = False) -> dict:
    dtype = DTYPES[dtype_name]
    workload = Workload.build(model, members, batch, device, dtype)
    fused = FusedEnsemble(workload.members).eval()
    optimized = fused.optimize(workload.x)
    single = workload.members[0]
    big_batch = torch.randn(members * batch, *input_shape(model), device=device, dtype=dtype)
    methods = {"loop": workload.loop(), "vmap": workload.vmap(), "fused": lambda: fused(workload.x),
               "optimized": lambda: optimized(workload.x), "single_member_NxB": lambda: single(big_batch)}
    if big_batch.dim() == 4:
        # The reference should be the best single member we can run, as optimize() may pick channels_last too.
        single_cl = copy.deepcopy(single).to(memory_format=torch.channels_last)
        big_batch_cl = big_batch.contiguous(memory_format=torch.channels_last)
        methods["single_member_NxB_channels_last"] = lambda: single_cl(big_batch_cl)
    if device == "cuda":
        methods["loop_graph"] = graphed(workload.loop(), device)
        if members * batch <= 2048:  # larger batches gain nothing from a graph and would pin its memory
            methods["single_member_NxB_graph"] = graphed(lambda: single(big_batch), device)
    compile_problem = None
    if compile_vmap:
        try:
            compiled = workload.vmap_compiled()
            with torch.no_grad():
                compiled()  # compiles here, outside the timed calls
            methods["vmap_compile"] = compiled
        except Exception as exc:  # "where it compiles": a model that does not is reported, not fatal
            compile_problem = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if optimize_compile:
        optimized_compiled = fused.optimize(workload.x, compile=True)
        methods["optimized_compile"] = lambda: optimized_compiled(workload.x)
    with torch.no_grad():
        reference = methods["loop"]()
        errors = {name: relative_error(methods[name](), reference)
                  for name in ("vmap", "vmap_compile", "fused", "optimized", "optimized_compile") if name in methods}
    timings = {name: median(times) for name, times in interleaved_times(methods, device, reps).items()}
    return {"model": model, "dtype": dtype_name, "members": members, "batch": batch, "ms": timings,
            "relative_error_vs_loop": errors, "vmap_compile_problem": compile_problem,
            "optimized_compile": optimized_compiled.extra_repr() if optimize_compile else None,
            "optimized": repr(optimized).splitlines()[0] + " " +
            optimized.extra_repr()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--optimize-compile", action="store_true",
                        help="also time fused.optimize(x, compile=True) (seconds to minutes of compiling per point)")
    parser.add_argument("--compile-vmap", action="store_true",
                        help="also time torch.compile of the vmap baseline (tens of seconds of compiling per point)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new point after this many seconds (for runs with a time limit)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    device = args.device
    reps = args.reps or (20 if device == "cuda" else 5)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    settle_cpu_allocator(device)
    peak = matmul_tflops(device)
    results = {"environment": environment_info(device), "bf16_matmul_tflops": peak, "points": []}
    print(f"{'model':<15}{'dtype':<9}{'N':>3}{'B':>5} " + " ".join(f"{m:>10}" for m in
          ("loop", "loop_graph", "vmap", "vmap_comp", "fused", "optimized", "opt_comp", "single_NB")) +
          "  speedup  TFLOP/s  eff")
    for model, dtype_name, members, batch in PRESETS[args.preset]:
        if args.budget_s is not None and time.monotonic() - started > args.budget_s:
            print(f"time budget spent: skipping {model} {dtype_name} N={members} B={batch} and later points")
            break
        try:
            point = run_point(model, dtype_name, members, batch, device, reps, args.compile_vmap,
                              args.optimize_compile)
        except Exception:  # one failing point must not lose the others' numbers
            traceback.print_exc()
            results["points"].append({"model": model, "dtype": dtype_name, "members": members, "batch": batch,
                                      "error": traceback.format_exc(limit=3)})
            continue
        finally:
            gc.collect()  # CUDA graphs of this point hold private memory pools until collected
            if device == "cuda":
                torch.cuda.empty_cache()
        flops = flops_per_sample(model) * members * batch
        ms = point["ms"]
        point["flops_per_forward"] = flops
        point["tflops"] = {name: flops / t / 1e9 for name, t in ms.items()}
        best_loop = min(ms["loop"], ms.get("loop_graph", float("inf")))
        point["speedup_optimized_vs_best_loop"] = best_loop / ms["optimized"]
        single = min(time for name, time in ms.items() if name.startswith("single_member_NxB"))
        point["ensemble_efficiency"] = single / ms["optimized"]
        if peak:
            point["fraction_of_bf16_matmul"] = point["tflops"]["optimized"] / peak
        results["points"].append(point)
        cells = [ms.get(name) for name in ("loop", "loop_graph", "vmap", "vmap_compile", "fused", "optimized",
                                           "optimized_compile", "single_member_NxB")]
        print(f"{model:<15}{dtype_name:<9}{members:>3}{batch:>5} " + " ".join(
            f"{c:>10.3f}" if c is not None else f"{'-':>10}" for c in cells) +
            f"  {point['speedup_optimized_vs_best_loop']:>6.2f}x {point['tflops']['optimized']:>8.1f} "
            f"{point['ensemble_efficiency']:>4.2f}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
