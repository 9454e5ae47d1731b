"""Sweeps the Triton reduction kernels' tile (rows per program x warps) on a GPU, for the short-row shapes where
the launcher's default tile is furthest from the copy bandwidth (K=10), and the split-K count for few long rows.

    python bench/triton_tile_sweep.py [--out PATH.json]

Each point is checked against eager on the first input (a mismatch is recorded, not fatal) and timed as in
reduce_gpu.py: CUDA-graph replays over inputs rotated past the L2 (device time, no launch gaps); GB/s counts the
logits read once and the outputs written once.
The winners feed the launcher's heuristic (kernels/ensemble_reduce.py, _Plan); the JSON keeps every point.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fused_ensemble.cli.environment import environment_info  # noqa: E402
from fused_ensemble.kernels import ensemble_reduce as er  # noqa: E402

import reduce_workloads as rw  # noqa: E402
from reduce_gpu import ROTATION_BYTES, copy_bandwidth, make_timer  # noqa: E402

SHORT_SHAPES = [(16, 65536, 10)]
SHORT_TILES = [(block_r, warps) for block_r in (32, 64, 128, 256, 512) for warps in (2, 4, 8)]
SHORT_WORKLOADS = ("mean_probs", "stats")  # softmax_of_mean already reads 0.96 of copy there
LONG_SHAPES = [(16, 8, 128256), (4, 33, 128256), (4, 131, 32000)]
SPLITS = (1, 4, 16, 64, None)  # None: the launcher's choice
WORKLOADS = ("mean_probs", "log_mean_probs", "softmax_of_mean", "stats")


def _kernel_call(workload: str, **tile):
    if workload == "stats":
        return lambda x: er.stats_forward(x, **tile)
    return lambda x: er.reduce_forward(x, workload, **tile)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    time_s = make_timer("cuda", fast=True)
    copy_gbs = copy_bandwidth("cuda", time_s)
    points = []

    def measure(shape, workload, tile):
        copies = max(2, -(-ROTATION_BYTES // (4 * shape[0] * shape[1] * shape[2])))
        inputs = [torch.randn(shape, device="cuda") for _ in range(copies)]
        fn = _kernel_call(workload, **tile)
        try:
            error = rw.check_against_eager(workload, fn(inputs[0]), rw.reference(workload)(inputs[0]))
        except AssertionError as exc:
            points.append({"N": shape[0], "B": shape[1], "K": shape[2], "workload": workload, "tile": tile,
                           "wrong": str(exc)})
            print(f"{str(shape):>20} {workload:<16} {str(tile):<44} WRONG: {exc}", flush=True)
            return
        seconds = time_s(fn, inputs)
        gbs = rw.bytes_moved(workload, shape) / seconds / 1e9
        point = {"N": shape[0], "B": shape[1], "K": shape[2], "workload": workload, "tile": tile,
                 "ms": seconds * 1e3, "GB/s": gbs, "copy_fraction": gbs / copy_gbs, "max_abs_error": error}
        points.append(point)
        print(f"{str(shape):>20} {workload:<16} {str(tile):<44} {seconds * 1e3:8.3f} ms {gbs:7.0f} GB/s "
              f"{gbs / copy_gbs:5.2f} of copy", flush=True)

    for shape in SHORT_SHAPES:
        for workload in SHORT_WORKLOADS:
            measure(shape, workload, {})
            for block_r, warps in SHORT_TILES:
                measure(shape, workload, {"block_r": block_r, "num_warps": warps})
    for shape in LONG_SHAPES:
        for workload in WORKLOADS:
            for splits in SPLITS:
                measure(shape, workload, {} if splits is None else {"splits": splits})
    report = {"environment": environment_info("cuda"), "card": torch.cuda.get_device_name(),
              "torch": torch.__version__, "copy_GB/s": copy_gbs, "timing": "triton.testing.do_bench median",
              "points": points}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
