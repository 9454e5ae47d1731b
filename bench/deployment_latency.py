"""CPU latency of a deployed ensemble: the ONNX file in ONNX Runtime and the AOTInductor package against the eager
FusedEnsemble, its ``optimize()``d module and the member loop, on the same members and inputs, in one process, the
methods taking turns (``interleaved_times``).

    python bench/deployment_latency.py --json bench/results/cpu-2core/deployment-<date>.json
    python bench/deployment_latency.py --preset smoke --json /tmp/deployment.json

Per model one ONNX file and one AOTInductor package (dynamic batch, ``"mean_probs"``) serve every batch size; each is
checked against the eager module before it is timed. ONNX Runtime runs on its CPU provider with as many intra-op
threads as torch uses (not spinning between calls). Ratios are speedups over the eager fused module (> 1: faster). The
rate of a float32 matmul before and after the run says how fast the (shared) machine was meanwhile.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from fused_ensemble import FusedEnsemble, export_onnx, export_pt2
from fused_ensemble.cli.environment import environment_info
from fused_ensemble.cli.models import input_shape
from fused_ensemble.cli.workloads import Workload, relative_error
from fused_ensemble.deploy.onnx_export import INPUT_NAME, OPSET
from fused_ensemble.inference.timing import interleaved_times, median, time_ms

# (model, members, batch sizes)
PRESETS = {
    "cpu": [("resnet18-cifar", 8, (1, 64)), ("lenet", 16, (64,))],
    "smoke": [("lenet", 2, (1, 4))],
}
METHODS = ("loop", "fused", "optimized", "onnxruntime", "aoti")
ORT_ALLOW_SPINNING = "session.intra_op.allow_spinning"  # an onnxruntime config key
TOLERANCE = 1e-4
"""Relative error allowed against the member loop before anything is timed (float32)."""


def onnx_runtime(path: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Its threads would otherwise spin after each call, taking the cores from the method timed next.
    options.add_session_config_entry(ORT_ALLOW_SPINNING, "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def matmul_gflops() -> float:
    """A float32 1024^3 matmul's rate: how fast the machine was while the benchmark ran (a shared VM varies)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    ms = median(time_ms(lambda: a @ b, "cpu", 20, warmup=3))
    return 2 * 1024 ** 3 / ms / 1e6


def export_artifacts(model: str, fused: FusedEnsemble, folder: Path) -> tuple[dict, dict]:
    """The model's ONNX Runtime and AOTInductor runners, and what exporting them cost."""
    example = torch.randn(2, *input_shape(model))
    start = time.perf_counter()
    onnx_path = export_onnx(fused, example, folder / f"{model}.onnx")
    onnx_seconds = time.perf_counter() - start
    start = time.perf_counter()
    pt2_path = export_pt2(fused, example, folder / f"{model}.pt2")
    pt2_seconds = time.perf_counter() - start
    runners = {"onnxruntime": onnx_runtime(onnx_path), "aoti": torch._inductor.aoti_load_package(str(pt2_path))}
    costs = {"onnx_export_s": onnx_seconds, "onnx_MB": onnx_path.stat().st_size / 1e6,
             "pt2_compile_s": pt2_seconds, "pt2_MB": pt2_path.stat().st_size / 1e6}
    return runners, costs


def measure_point(workload: Workload, fused: FusedEnsemble, runners: dict, reps: int) -> dict:
    x = workload.x
    optimized = fused.optimize(x)
    x_numpy = x.numpy()
    ort, aoti = runners["onnxruntime"], runners["aoti"]
    calls = {"loop": workload.loop(), "fused": lambda: fused(x), "optimized": lambda: optimized(x),
             "onnxruntime": lambda: torch.from_numpy(ort.run(None, {INPUT_NAME: x_numpy})[0]),
             "aoti": lambda: aoti(x)}
    with torch.no_grad():
        outputs = {name: call() for name, call in calls.items()}
    errors = {name: relative_error(out, outputs["loop"]) for name, out in outputs.items()}
    for name, error in errors.items():
        if error > TOLERANCE:
            raise RuntimeError(f"{workload.model} N={workload.num_members} B={workload.batch}: {name} differs from "
                               f"the member loop: relative error {error:.2e} > {TOLERANCE:.0e}")
    times = interleaved_times(calls, "cpu", reps)
    ms = {name: median(times[name]) for name in METHODS}
    return {"model": workload.model, "members": workload.num_members, "batch": workload.batch,
            "ms": ms, "speedup_vs_fused": {name: ms["fused"] / ms[name] for name in METHODS},
            "speedup_vs_loop": {name: ms["loop"] / ms[name] for name in METHODS},
            "relative_error_vs_loop": errors, "optimized": optimized.extra_repr(), "times_ms": times}


def run(preset: str, reps: int) -> dict:
    import onnxruntime

    points, exports = [], {}
    gflops_before = matmul_gflops()
    with tempfile.TemporaryDirectory() as folder:
        for model, members, batches in PRESETS[preset]:
            workload = Workload.build(model, members, batches[0], "cpu", torch.float32)
            fused = FusedEnsemble(workload.members).eval()
            print(f"{model}, N={members}: exporting", file=sys.stderr, flush=True)
            runners, exports[model] = export_artifacts(model, fused, Path(folder))
            for batch in batches:
                print(f"{model}, N={members}, B={batch}: timing", file=sys.stderr, flush=True)
                workload.batch = batch
                workload.x = torch.randn(batch, *input_shape(model), generator=torch.Generator().manual_seed(batch))
                points.append(measure_point(workload, fused, runners, reps))
    return {"benchmark": "deployment latency", "device": "cpu", "dtype": "float32", "reduction": "mean_probs",
            "onnx_opset": OPSET, "onnxruntime": onnxruntime.__version__,
            "onnxruntime_threads": torch.get_num_threads(), "reps": reps,
            "matmul_gflops_before_after": [gflops_before, matmul_gflops()], "exports": exports, "points": points,
            "environment": environment_info("cpu")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per method, at least (default 5)")
    parser.add_argument("--note", default=None, help="a note stored in the result file (e.g. the machine's load)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON to PATH")
    args = parser.parse_args(argv)
    result = run(args.preset, args.reps)
    if args.note:
        result["note"] = args.note
    for point in result["points"]:
        ratios = ", ".join(f"{name} {point['speedup_vs_fused'][name]:.2f}x" for name in METHODS)
        print(f"{point['model']} N={point['members']} B={point['batch']}: fused {point['ms']['fused']:.2f} ms; "
              f"speedup over fused: {ratios}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
