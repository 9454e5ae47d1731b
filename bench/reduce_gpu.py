"""GPU benchmark of the ensemble reduction: eager, torch.compile, Triton and CUDA C++ on the benchmark's shape matrix.

    python bench/reduce_gpu.py [--out bench/results/<machine>/reduce-<date>.json] [--static-compile]
                               [--dtype {float32,bfloat16,float16}]
    python bench/reduce_gpu.py --smoke      # CPU, tiny shapes: checks the script end to end without a GPU

For every shape (N in {4, 8, 16} x K in {10, 1000, 32000, 128256}, B making the input >= 64 MB, plus
N=16, B=65536, K=10) and every workload (four reductions and ensemble_stats) it checks each implementation
against eager and reports GB/s (logits read once + outputs written once), the fraction of a device-to-device
copy's bandwidth and the speedup over eager.

On a GPU the time per call comes from CUDA-graph replays of calls on rotated inputs (their set exceeds the 50 MB
L2 of an H100), median of triton.testing.do_bench_cudagraph: device time, with no launch gaps. A 64 MB input
moves in about 25 us, while a Python call through the public API costs 15-100 us on the host, so timing calls
one by one measures the host (a first run did: bench/NOTES.md). The host cost is reported separately, as the
per-call latency of each implementation on a tiny input (``latency_us``). The copy is timed the same way.
torch.compile of the reference is compiled with dynamic shapes by default (one compile per workload keeps the
run under 2 minutes); ``--static-compile`` compiles once per shape instead (the best case for torch.compile).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from fused_ensemble.cli.environment import environment_info

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reduce_workloads as rw  # noqa: E402

ROTATION_BYTES = 160 * 2**20   # > 3x the L2 of an H100: every timed call reads its input from HBM


def make_timer(device: str, fast: bool):
    """A function (fn, inputs) -> median seconds per call of fn on one of the inputs."""
    if device == "cuda":
        import triton.testing

        def cuda_time(fn, inputs):
            for x in inputs:  # compiles and autotunes outside the capture
                fn(x)
            torch.cuda.synchronize()
            ms = triton.testing.do_bench_cudagraph(lambda: [fn(x) for x in inputs], rep=30 if fast else 100,
                                                   return_mode="median")
            return ms / len(inputs) / 1e3
        return cuda_time

    def cpu_time(fn, inputs):
        call = _rotating(fn, inputs)
        call()
        times = []
        for _ in range(5 if fast else 20):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    return cpu_time


def _latency_us(fn, x, device: str) -> float:
    """Median wall time of one call on a tiny input, synchronized: what a call costs the host."""
    fn(x)
    times = []
    for _ in range(50):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(x)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def _rotating(fn, inputs):
    """Calls fn on the next input each time, so consecutive calls never find their input in cache."""
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(inputs)
        return fn(inputs[state["i"]])
    return call


def copy_bandwidth(device: str, time_fn) -> float:
    """GB/s of a device-to-device copy of 256 MB (bytes read + bytes written)."""
    nbytes = (256 if device == "cuda" else 32) * 2**20
    src = torch.empty(nbytes // 4, device=device).normal_()
    dst = torch.empty_like(src)
    return 2 * nbytes / time_fn(lambda s: dst.copy_(s), [src]) / 1e9


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run(out_json_path: str | None, smoke: bool = False, static_compile: bool = False,
        dtype: torch.dtype = torch.float32) -> dict:
    """Runs the matrix on ``dtype`` logits (outputs are float32 whatever the input dtype), writes the JSON results
    to ``out_json_path`` (if given) and returns them."""
    device = "cpu" if smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("reduce_gpu.py needs a CUDA device (use --smoke to check it on the CPU)")
    torch.manual_seed(0)
    time_fn = make_timer(device, fast=True)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    shapes = rw.SMOKE_SHAPES if smoke else rw.gpu_shapes(itemsize)
    copy_gbs = copy_bandwidth(device, time_fn)
    implementations = {}
    for workload in rw.WORKLOADS:
        for name in rw.IMPLEMENTATIONS:
            implementations[workload, name] = rw.implementation(name, workload, device,
                                                                dynamic_compile=not static_compile, dtype=dtype)
    tiny = torch.randn(2, 4, 10, device=device).to(dtype)
    latency = {f"{workload}/{name}": _latency_us(fn, tiny, device)
               for (workload, name), (fn, _) in implementations.items() if fn is not None and name != "compile"}
    import triton
    card = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    # Printed and written first, and the JSON rewritten after every shape: a run cut short by its time limit
    # still leaves every finished row and the copy bandwidth they are compared with.
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s on {card}")
    print("per-call latency on a [2, 4, 10] input (us): " + ", ".join(f"{k} {v:.0f}" for k, v in latency.items()))
    results = []
    report = {
        "environment": environment_info(device),
        "card": card, "device": device, "torch": torch.__version__, "triton": triton.__version__,
        "threads": torch.get_num_threads(), "dtype": str(dtype).replace("torch.", ""),
        "compile_mode": "static" if static_compile else "dynamic", "copy_GB/s": copy_gbs,
        "timing": "triton.testing.do_bench_cudagraph median over rotated inputs" if device == "cuda"
        else "perf_counter median", "latency_us_tiny_input": latency, "results": results,
    }
    for shape in shapes:
        nbytes_in = shape[0] * shape[1] * shape[2] * itemsize
        copies = max(2, -(-ROTATION_BYTES // nbytes_in)) if device == "cuda" else 1
        inputs = [torch.randn(shape, device=device).to(dtype) for _ in range(copies)]
        for workload in rw.WORKLOADS:
            results.append(_measure_row(shape, workload, inputs, implementations, time_fn, copy_gbs, itemsize))
            _print_row(results[-1])
        del inputs
        if device == "cuda":
            torch.cuda.empty_cache()
        if out_json_path:
            _write(report, out_json_path)
    if out_json_path:
        print(f"wrote {out_json_path}")
    return report


def _measure_row(shape, workload, inputs, implementations, time_fn, copy_gbs, itemsize: int = 4) -> dict:
    expected = rw.reference(workload)(inputs[0])
    row = {"N": shape[0], "B": shape[1], "K": shape[2], "workload": workload,
           "bytes": rw.bytes_moved(workload, shape, itemsize), "ms": {}, "GB/s": {}, "copy_fraction": {},
           "speedup_vs_eager": {}, "max_abs_error_vs_eager": {}, "skipped": {}}
    for name in rw.IMPLEMENTATIONS:
        fn, problem = implementations[workload, name]
        if fn is not None and rw.shape_problem(name, shape):
            fn, problem = None, rw.shape_problem(name, shape)
        if fn is None:
            row["skipped"][name] = problem
            continue
        try:
            row["max_abs_error_vs_eager"][name] = rw.check_against_eager(workload, fn(inputs[0]), expected)
            seconds = time_fn(fn, inputs)
        except Exception as exc:  # one broken implementation must not lose the rest of the run
            row["skipped"][name] = f"{type(exc).__name__}: {exc}"
            continue
        row["ms"][name] = seconds * 1e3
        row["GB/s"][name] = row["bytes"] / seconds / 1e9
        row["copy_fraction"][name] = row["GB/s"][name] / copy_gbs
    if "eager" in row["ms"]:
        row["speedup_vs_eager"] = {name: row["ms"]["eager"] / ms for name, ms in row["ms"].items()}
    return row


def _write(report: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


_header_printed = []


def _print_row(row: dict) -> None:
    """One line per (shape, workload): GB/s of each implementation and its speedup over eager."""
    if not _header_printed:
        print(f"{'N':>3} {'B':>7} {'K':>6} {'workload':<16}" + "".join(f"{n:>20}" for n in rw.IMPLEMENTATIONS))
        _header_printed.append(True)
    cells = []
    for name in rw.IMPLEMENTATIONS:
        if name in row["GB/s"]:
            cells.append(f"{row['GB/s'][name]:8.0f} GB/s {row['speedup_vs_eager'].get(name, 0):5.2f}x")
        else:
            cells.append("-")
    print(f"{row['N']:>3} {row['B']:>7} {row['K']:>6} {row['workload']:<16}" + "".join(f"{c:>20}" for c in cells),
          flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="JSON results path (default: bench/results/<machine>/reduce-<dtype>-<date>.json;"
                                      " none with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: an end-to-end check")
    parser.add_argument("--static-compile", action="store_true",
                        help="compile the reference once per shape instead of once with dynamic shapes")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="dtype of the logits (every input stays >= 64 MB: B grows for 2-byte dtypes)")
    args = parser.parse_args(argv)
    out = args.out
    if out is None and not args.smoke:
        environment = environment_info("cuda" if torch.cuda.is_available() else "cpu")
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", environment["machine"],
                           f"reduce-{args.dtype}-{environment['date']}.json")
        os.makedirs(os.path.dirname(out), exist_ok=True)
    run(out, smoke=args.smoke, static_compile=args.static_compile, dtype=DTYPES[args.dtype])


if __name__ == "__main__":
    main()
