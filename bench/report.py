"""Markdown tables from the benchmark results, bench/results/<machine>/<workload>-<date>.json.

    python bench/report.py --all                  # every section
    python bench/report.py --section training     # one section
    python bench/report.py --list                 # the section names

A docs build imports it and calls ``sections()`` (section name -> Markdown). Every cell comes from a result file, and
every table names its files, machine and date. Each benchmark script writes its own schema (see the script named in
the file's ``environment.command``); a key a file lacks shows as a dash.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DASH = "-"


# ---- reading -----------------------------------------------------------------------------------------------------

def load_results(results_dir: Path | str | None = None) -> list[dict]:
    """Every result file under ``results_dir`` (default bench/results), sorted by path: dicts with ``path`` (relative
    to the repository, e.g. ``bench/results/h100/optim-2026-11-27.json``), ``machine``, ``workload``, ``date`` (from
    the file name) and ``data`` (the parsed JSON)."""
    root = Path(results_dir) if results_dir is not None else RESULTS
    found = []
    for path in sorted(root.glob("*/*.json")):
        match = re.fullmatch(r"(?P<workload>.+)-(?P<date>\d{4}-\d{2}-\d{2})", path.stem)
        if match is None:
            continue
        with open(path) as f:
            data = json.load(f)
        found.append({"path": f"bench/results/{path.parent.name}/{path.name}", "machine": path.parent.name,
                      "workload": match["workload"], "date": match["date"], "data": data})
    return found


def _select(results: list[dict], prefix: str, machine: str | None = None) -> list[dict]:
    return [r for r in results if (r["workload"] == prefix or r["workload"].startswith(prefix + "-"))
            and (machine is None or r["machine"] == machine)]


def _get(mapping, *keys):
    """mapping[k0][k1]...; None where any level is missing."""
    for key in keys:
        if not isinstance(mapping, dict) or key not in mapping:
            return None
        mapping = mapping[key]
    return mapping


# ---- formatting --------------------------------------------------------------------------------------------------

def fmt_ms(value) -> str:
    """A time in ms with three significant figures (at least whole units)."""
    if not isinstance(value, (int, float)):
        return DASH
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def fmt_fixed(value, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else DASH


def fmt_ratio(value) -> str:
    return f"{value:.2f}x" if isinstance(value, (int, float)) else DASH


def _ratio(numerator, denominator):
    if isinstance(numerator, (int, float)) and isinstance(denominator, (int, float)) and denominator:
        return numerator / denominator
    return None


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _short_commit(commit) -> str:
    if not isinstance(commit, str):
        return DASH
    return commit[:7] if re.fullmatch(r"[0-9a-f]{40}", commit) else commit


def source_line(result: dict) -> str:
    """Where a table's numbers come from: file, machine, card, versions, commit, date."""
    env = result["data"].get("environment", {})
    parts = [f"`{result['path']}`", f"machine `{result['machine']}` ({env.get('card') or DASH})",
             f"torch {env.get('torch') or DASH}"]
    if env.get("triton"):
        parts.append(f"triton {env['triton']}")
    parts.append(f"commit `{_short_commit(env.get('commit'))}`")
    parts.append(env.get("date") or result["date"])
    return "Source: " + ", ".join(parts) + "."


# ---- (a) fused inference -------------------------------------------------------------------------------------------

INFERENCE_METHODS = (("loop", "loop"), ("loop_graph", "loop + graph"), ("vmap", "vmap"),
                     ("vmap_compile", "vmap compiled"), ("fused", "fused"), ("optimized", "optimized"),
                     ("optimized_compile", "optimized, compiled"))


def _best_single(ms: dict):
    times = [t for name, t in ms.items() if name.startswith("single_member_NxB") and isinstance(t, (int, float))]
    return min(times) if times else None


def _chosen(description) -> str:
    """optimize()'s choices, from the repr the throughput script stores: execution, memory format, CUDA graph."""
    if not isinstance(description, str):
        return DASH
    parts = []
    execution = re.search(r"execution='(\w+)'", description)
    if execution:
        parts.append(execution[1].replace("_", " "))
    memory_format = re.search(r"memory_format=torch\.(\w+)", description)
    if memory_format:
        parts.append(memory_format[1])
    if "cuda_graph=True" in description:
        parts.append("CUDA graph")
    return ", ".join(parts) or DASH


def inference_table(result: dict) -> str:
    """One ensemble_throughput.py file: ms per forward of each method, the ratios and optimize()'s choice."""
    points = result["data"].get("points", [])
    present = [(key, label) for key, label in INFERENCE_METHODS
               if any(_get(p, "ms", key) is not None for p in points)]
    header = (["model", "dtype", "N", "B"] + [f"{label} (ms)" for _, label in present] +
              ["1 member at N*B (ms)", "optimized vs best loop", "fused vs best loop", "optimized TFLOP/s",
               "efficiency", "chosen"])
    rows = []
    for p in points:
        ms = p.get("ms") or {}
        base = [p.get("model", DASH), p.get("dtype", DASH), p.get("members", DASH), p.get("batch", DASH)]
        if "error" in p:
            error = p["error"].strip().splitlines()[-1].split(":")[0] if p["error"].strip() else "error"
            rows.append(base + [DASH] * (len(header) - len(base) - 1) + [f"failed: {error}"])
            continue
        loops = [t for t in (ms.get("loop"), ms.get("loop_graph")) if isinstance(t, (int, float))]
        best_loop = min(loops) if loops else None
        rows.append(base + [fmt_ms(ms.get(key)) for key, _ in present] + [
            fmt_ms(_best_single(ms)), fmt_ratio(p.get("speedup_optimized_vs_best_loop")),
            fmt_ratio(_ratio(best_loop, ms.get("fused"))), fmt_fixed(_get(p, "tflops", "optimized"), 1),
            fmt_fixed(p.get("ensemble_efficiency"), 2), _chosen(p.get("optimized"))])
    notes = []
    if isinstance(result["data"].get("bf16_matmul_tflops"), (int, float)):
        notes.append(f"bf16 8192^3 matmul in the same process: {result['data']['bf16_matmul_tflops']:.0f} TFLOP/s.")
    return "\n\n".join([source_line(result) + (" " + " ".join(notes) if notes else ""),
                        table(header, rows)])


def section_inference(results: list[dict], machine: str) -> str:
    files = _select(results, "ensemble", machine)
    intro = (f"Ensemble inference on `{machine}` (`bench/ensemble_throughput.py`): ms per forward including the "
             "reduction, median; \"best loop\" is the faster of the loop and its CUDA graph; \"1 member at N*B\" is "
             "the fastest single-member reference; efficiency = t_single(N*B) / t_optimized.")
    return "\n\n".join([intro] + [inference_table(r) for r in files]) if files else ""


# ---- (e) the bench command -------------------------------------------------------------------------------------------

BENCH_METHODS = (("loop", "member loop"), ("vmap", "torch.func vmap"), ("vmap_compile", "vmap compiled"),
                 ("fused", "FusedEnsemble"), ("optimized", "optimize(x)"),
                 ("optimized_compile", "optimize(x, compile=True)"))


def section_bench_cli(results: list[dict]) -> str:
    parts = [("`python -m fused_ensemble bench` on the 2-core CPU: one workload, every method verified against the "
             "loop, then timed (median ms).")]
    for result in _select(results, "bench-cli", "cpu-2core"):
        data = result["data"]
        methods = data.get("results", {})
        rows = [[label, fmt_ms(_get(methods, key, "ms")), fmt_fixed(_get(methods, key, "images_per_s"), 1),
                 fmt_ratio(_get(methods, key, "speedup_vs_loop")), fmt_ratio(_get(methods, key, "speedup_vs_vmap"))]
                for key, label in BENCH_METHODS if key in methods]
        what = (f"{data.get('model', DASH)}, N={data.get('members', DASH)}, B={data.get('batch', DASH)}, "
                f"{data.get('dtype', DASH)}, {data.get('device', DASH)}.")
        parts.append(source_line(result) + " " + what)
        parts.append(table(["method", "ms", "images/s", "vs loop", "vs vmap"], rows))
    return "\n\n".join(parts) if len(parts) > 1 else ""


# ---- (b) reduction kernels -----------------------------------------------------------------------------------------

BACKEND_ORDER = ("eager", "compile", "triton", "cpp", "cpp_short_rows")
BACKEND_LABELS = {"eager": "eager", "compile": "torch.compile", "triton": "Triton", "cpp": "CUDA C++",
                  "cpp_short_rows": "CUDA C++ short rows"}


def _backends(rows: list[dict]) -> list[str]:
    seen = {name for row in rows for name in (row.get("GB/s") or {})}
    return [b for b in BACKEND_ORDER if b in seen] + sorted(seen - set(BACKEND_ORDER))


def reduce_gpu_table(result: dict) -> str:
    """One reduce_gpu.py file: GB/s of every backend per shape and workload, with the fraction of the same run's
    device copy (or of the copy the file names) in parentheses."""
    data = result["data"]
    rows = data.get("results", [])
    backends = _backends(rows)
    fraction_key = "copy_fraction" if any("copy_fraction" in r for r in rows) else "copy_fraction_vs_run1_copy"
    copy = data.get("copy_GB/s", data.get("reference_copy_GB/s"))
    body = []
    for row in rows:
        cells = []
        for name in backends:
            gbs = _get(row, "GB/s", name)
            fraction = _get(row, fraction_key, name)
            cells.append(DASH if gbs is None else
                         f"{gbs:.0f}" + (f" ({fraction:.2f})" if isinstance(fraction, (int, float)) else ""))
        body.append([row.get("N", DASH), row.get("B", DASH), row.get("K", DASH), row.get("workload", DASH)] + cells)
    caption = (f"{source_line(result)} dtype {data.get('dtype', DASH)}; timing: {data.get('timing', DASH)}; "
               f"device copy {fmt_fixed(copy, 0)} GB/s.")
    if data.get("note"):
        caption += f" Note: {data['note']}"
    header = ["N", "B", "K", "workload"] + [f"{BACKEND_LABELS.get(b, b)} GB/s (of copy)" for b in backends]
    return caption + "\n\n" + table(header, body)


def triton_rows_table(result: dict) -> str:
    """The graph-timed Triton file: GB/s, fraction of copy and speedup over eager per shape, dtype and op."""
    data = result["data"]
    body = [[r.get("N", DASH), r.get("R", DASH), r.get("K", DASH), str(r.get("dtype", DASH)).replace("torch.", ""),
             r.get("op", DASH), fmt_fixed(r.get("GBps"), 0), fmt_fixed(r.get("frac_copy"), 2),
             fmt_fixed(r.get("us"), 1), fmt_fixed(r.get("eager_us"), 1), fmt_ratio(r.get("speedup"))]
            for r in data.get("rows", [])]
    caption = (f"{source_line(result)} Triton only, CUDA-graph replays over rotated inputs; device copy "
               f"{fmt_fixed(data.get('copy_GBps'), 0)} GB/s.")
    return caption + "\n\n" + table(["N", "B", "K", "dtype", "workload", "Triton GB/s", "of copy", "Triton us",
                                     "eager us", "vs eager"], body)


def section_reduction_gpu(results: list[dict], machine: str = "h100") -> str:
    files = _select(results, "reduce", machine)
    parts = [(f"Ensemble reduction kernels on `{machine}`: GB/s count the logits read once plus the outputs written "
             "once; in parentheses the fraction of a device-to-device copy.")]
    for result in files:
        if "results" in result["data"]:
            parts.append(reduce_gpu_table(result))
        elif "rows" in result["data"]:
            parts.append(triton_rows_table(result))
    return "\n\n".join(parts) if len(parts) > 1 else ""


def _benchmarks_by(result: dict, key) -> dict:
    """pytest-benchmark entries keyed by ``key(entry)``: each a dict implementation -> median ms."""
    grouped: dict = {}
    for entry in result["data"].get("benchmarks", []):
        implementation = _get(entry, "extra_info", "implementation") or _get(entry, "params", "name")
        median = _get(entry, "stats", "median")
        grouped.setdefault(key(entry), {})[implementation] = median * 1e3 if median is not None else None
    return grouped


def section_reduction_cpu(results: list[dict]) -> str:
    parts = [("Ensemble reduction kernels on the 2-core CPU (`bench/test_bench_reduce.py`, pytest-benchmark): median "
             "ms of eager PyTorch / torch.compile of it / the C++ kernel, and the C++ kernel's speedup over eager.")]
    for result in _select(results, "reduce", "cpu-2core"):
        grouped = _benchmarks_by(result, lambda e: (tuple(_get(e, "params", "shape") or ()),
                                                    _get(e, "params", "workload")))
        shapes = list(dict.fromkeys(shape for shape, _ in grouped))
        workloads = list(dict.fromkeys(workload for _, workload in grouped))
        rows = []
        for shape in shapes:
            cells = []
            for workload in workloads:
                times = grouped.get((shape, workload), {})
                cells.append(" / ".join(fmt_ms(times.get(name)) for name in ("eager", "compile", "cpp")) +
                             f" ({fmt_ratio(_ratio(times.get('eager'), times.get('cpp')))})")
            rows.append([", ".join(str(s) for s in shape)] + cells)
        parts.append(source_line(result))
        parts.append(table(["N, B, K"] + list(workloads), rows))
    return "\n\n".join(parts) if len(parts) > 1 else ""


# ---- (c) training ------------------------------------------------------------------------------------------------

TRAIN_IMPLEMENTATIONS = ("loop", "vmap", "fused", "fused_compile", "fused_member_backward")


def _ordered(names) -> list[str]:
    names = list(dict.fromkeys(names))
    return [n for n in TRAIN_IMPLEMENTATIONS if n in names] + [n for n in names if n not in TRAIN_IMPLEMENTATIONS]


def interleaved_training_table(result: dict) -> str:
    """One train_throughput.py file: ms per step of each implementation (taking turns), per point."""
    points = result["data"].get("points", [])
    names = _ordered(name for p in points for name in list(p.get("ms", {})) + list(p.get("unsupported") or {}))
    rows = []
    for p in points:
        ms = p.get("ms", {})
        rows.append([p.get("members", DASH), p.get("batch_per_member", DASH), p.get("memory_format", DASH),
                     p.get("precision", DASH)] + [fmt_ms(ms.get(n)) for n in names] +
                    [fmt_ratio(p.get("fused_vs_loop")), fmt_ratio(p.get("fused_vs_vmap")),
                     fmt_fixed(_get(p, "member_images_per_s", "fused"), 0)])
    header = (["N", "B per member", "layout", "precision"] + [f"{n} (ms)" for n in names] +
              ["fused vs loop", "fused vs vmap", "member-images/s, fused"])
    caption = (f"{source_line(result)} {result['data'].get('model', DASH)}; the implementations take turns in "
               f"{result['data'].get('rounds', DASH)} rounds.")
    return caption + "\n\n" + table(header, rows)


def pytest_training_table(result: dict) -> str:
    """One test_bench_train.py file (pytest-benchmark): median ms per step, each implementation timed in a block."""
    grouped = _benchmarks_by(result, lambda e: (_get(e, "extra_info", "members"),
                                                _get(e, "extra_info", "batch_per_member")))
    names = _ordered(name for times in grouped.values() for name in times)
    rows = [[members, batch] + [fmt_ms(times.get(n)) for n in names] +
            [fmt_ratio(_ratio(times.get("loop"), times.get("fused"))),
             fmt_ratio(_ratio(times.get("vmap"), times.get("fused")))]
            for (members, batch), times in grouped.items()]
    header = ["N", "B per member"] + [f"{n} (ms)" for n in names] + ["fused vs loop", "fused vs vmap"]
    return (f"{source_line(result)} pytest-benchmark, each implementation timed in a block of its own.\n\n" +
            table(header, rows))


def section_training(results: list[dict]) -> str:
    parts = [("Training throughput: one step (forward, backward, SGD step) of CIFAR ResNet-18 members, median ms "
             "(`bench/train_throughput.py` takes turns; `bench/test_bench_train.py` times blocks).")]
    for machine in ("h100", "cpu-2core"):
        for result in _select(results, "train", machine):
            if "points" in result["data"]:
                parts.append(interleaved_training_table(result))
            elif "benchmarks" in result["data"]:
                parts.append(pytest_training_table(result))
    return "\n\n".join(parts) if len(parts) > 1 else ""


def section_training_profile(results: list[dict]) -> str:
    parts = ["Where a training step's time goes (`bench/profile_train_step.py`), ms per step by kind of work."]
    for machine in ("h100", "cpu-2core"):
        for result in _select(results, "profile-train", machine):
            data = result["data"]
            impls = data.get("implementations", {})
            names = list(impls)
            kinds = list(dict.fromkeys(k for i in impls.values() for k in (i.get("kinds_ms_per_step") or {})))
            rows = [["wall (profiler off)"] + [fmt_ms(_get(impls, n, "wall_ms_per_step")) for n in names],
                    ["profiled total"] + [fmt_ms(_get(impls, n, "profiled_ms_per_step")) for n in names]]
            rows += [[kind] + [fmt_ms(_get(impls, n, "kinds_ms_per_step", kind)) for n in names] for kind in kinds]
            what = (f"{data.get('model', DASH)}, N={data.get('members', DASH)}, B={data.get('batch', DASH)} per "
                    f"member, {data.get('memory_format', 'contiguous_format')}, "
                    f"{data.get('precision', 'float32')}; time: {data.get('time', DASH)}.")
            parts.append(source_line(result) + " " + what)
            parts.append(table(["ms per step"] + names, rows))
    return "\n\n".join(parts) if len(parts) > 1 else ""


# ---- (d) optimizer step --------------------------------------------------------------------------------------------

def section_optimizer(results: list[dict]) -> str:
    parts = [("One optimizer step over the members' parameters (`bench/test_bench_optim.py`, pytest-benchmark), "
             "median ms per group (optimizer step, gradient clipping, loss-scale unscaling).")]
    for machine in ("h100", "cpu-2core"):
        for result in _select(results, "optim", machine):
            grouped = _benchmarks_by(result, lambda e: e.get("group"))
            names = list(dict.fromkeys(name for times in grouped.values() for name in times))
            rows = [[group] + [fmt_ms(times.get(n)) for n in names] for group, times in grouped.items()]
            caption = source_line(result)
            if result["data"].get("note"):
                caption += f" Note: {result['data']['note']}"
            parts.append(caption)
            parts.append(table(["group"] + names, rows))
    return "\n\n".join(parts) if len(parts) > 1 else ""


# ---- training on digits ------------------------------------------------------------------------------------------

def section_digits(results: list[dict]) -> str:
    parts = [("Training on scikit-learn's digits (`python -m fused_ensemble train --dataset digits`): test metrics of "
             "the mean member and the ensemble.")]
    for result in _select(results, "digits"):
        d = result["data"]
        rows = [[who] + [fmt_fixed(d.get(f"{prefix}_{metric}"), 4) for metric in ("accuracy", "nll", "brier", "ece")]
                for who, prefix in (("mean member", "mean_member"), ("ensemble", "ensemble"))]
        held_out = (f" ({d['calibration_examples']} of the training examples held out for calibration)"
                    if "calibration_examples" in d else "")
        what = (f"{d.get('members', DASH)} x {d.get('model', DASH)}, {d.get('epochs', DASH)} epochs{held_out}: "
                f"{fmt_fixed(d.get('train_seconds'), 2)} s of training, "
                f"{fmt_fixed(d.get('train_member_images_per_s'), 0)} member-images/s.")
        parts.append(source_line(result) + " " + what)
        parts.append(table(["", "accuracy", "NLL", "Brier", "ECE"], rows))
    return "\n\n".join(parts) if len(parts) > 1 else ""


def section_calibration(results: list[dict]) -> str:
    parts = [("`python -m fused_ensemble train --dataset digits --calibrate`: the ensemble on the test split before "
              "and after the temperature fitted on the examples held out of the training split, and the conformal "
              "prediction sets calibrated on the same held-out examples.")]
    for result in _select(results, "digits"):
        d = result["data"]
        if "ensemble_ece_calibrated" not in d:
            continue
        metric_names = ("nll", "brier", "ece")
        rows = [["before", "1"] + [fmt_fixed(d.get(f"ensemble_{m}"), 4) for m in metric_names],
                ["after", fmt_fixed(d.get("temperature"), 3)]
                + [fmt_fixed(d.get(f"ensemble_{m}_calibrated"), 4) for m in metric_names]]
        conformal = (f"Conformal `{d.get('conformal_score', DASH)}` sets at alpha {d.get('alpha', DASH)}: coverage "
                     f"{fmt_fixed(d.get('conformal_coverage'), 4)}, mean set size "
                     f"{fmt_fixed(d.get('conformal_mean_set_size'), 2)} classes (threshold "
                     f"{fmt_fixed(d.get('conformal_threshold'), 4)}).")
        what = (f"{d.get('members', DASH)} x {d.get('model', DASH)}, ensemble accuracy "
                f"{fmt_fixed(d.get('ensemble_accuracy'), 4)} on {d.get('test_examples', DASH)} test examples; "
                f"{d.get('calibration_examples', DASH)} held-out examples. {conformal}")
        parts.append(source_line(result) + " " + what)
        parts.append(table(["ensemble", "temperature", "NLL", "Brier", "ECE"], rows))
    return "\n\n".join(parts) if len(parts) > 1 else ""


# ---- deployment -------------------------------------------------------------------------------------------------

DEPLOYMENT_METHODS = (("loop", "member loop"), ("fused", "fused, eager"), ("optimized", "optimize(x)"),
                      ("onnxruntime", "ONNX Runtime"), ("aoti", "AOTInductor"))


def section_deployment(results: list[dict], machine: str = "cpu-2core") -> str:
    parts = [(f"Deployed ensembles on `{machine}` (`bench/deployment_latency.py`): ms per forward including the "
              "`mean_probs` reduction (median, the methods taking turns in one process), and the speedup of each over "
              "the eager fused module. One ONNX file and one AOTInductor package with a dynamic batch serve every "
              "batch size of a model.")]
    for result in _select(results, "deployment", machine):
        data = result["data"]
        rows = []
        for p in data.get("points", []):
            ms, speedup = p.get("ms") or {}, p.get("speedup_vs_fused") or {}
            rows.append([p.get("model", DASH), p.get("members", DASH), p.get("batch", DASH)] +
                        [fmt_ms(ms.get(key)) for key, _ in DEPLOYMENT_METHODS] +
                        [fmt_ratio(speedup.get(key)) for key, _ in DEPLOYMENT_METHODS if key != "fused"])
        header = (["model", "N", "B"] + [f"{label} (ms)" for _, label in DEPLOYMENT_METHODS] +
                  [f"{label} vs fused" for key, label in DEPLOYMENT_METHODS if key != "fused"])
        caption = (f"{source_line(result)} ONNX opset {data.get('onnx_opset', DASH)}, ONNX Runtime "
                   f"{data.get('onnxruntime', DASH)} with {data.get('onnxruntime_threads', DASH)} intra-op threads.")
        rates = data.get("matmul_gflops_before_after")
        if isinstance(rates, list) and len(rates) == 2:
            caption += (f" A float32 1024^3 matmul ran at {fmt_fixed(rates[0], 0)} GFLOP/s before the run and "
                        f"{fmt_fixed(rates[1], 0)} after.")
        if data.get("note"):
            caption += f" Note: {data['note']}"
        exports = data.get("exports") or {}
        export_rows = [[model, fmt_fixed(e.get("onnx_export_s"), 1), fmt_fixed(e.get("onnx_MB"), 1),
                        fmt_fixed(e.get("pt2_compile_s"), 1), fmt_fixed(e.get("pt2_MB"), 1)]
                       for model, e in exports.items()]
        parts += [caption, table(header, rows)]
        if export_rows:
            parts.append(table(["model", "ONNX export (s)", "ONNX file (MB)", "AOTInductor compile (s)",
                                "package (MB)"], export_rows))
    return "\n\n".join(parts) if len(parts) > 1 else ""


# ---- the CPU allocator ---------------------------------------------------------------------------------------------

def _fmt_count(value) -> str:
    if not isinstance(value, (int, float)):
        return DASH
    return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.1f}k" if value >= 1e3 else f"{value:.0f}"


def _allocator_cell(cell) -> str:
    if not isinstance(cell, dict):
        return DASH
    return (f"+{fmt_fixed(cell.get('peak_increase_mb'), 0)} / {_fmt_count(cell.get('minor_faults_per_step'))} / "
            f"{fmt_ms(cell.get('ms_per_step'))}")


def section_cpu_allocator(results: list[dict]) -> str:
    parts = [("Fused ensembles on the 2-core CPU under glibc malloc settings (`bench/cpu_memory_peak.py`), each "
              "workload and setting in a fresh process: peak resident size over the built model's (MB), minor page "
              "faults per step and median ms per step, per setting.")]
    for result in _select(results, "cpu-allocator", "cpu-2core"):
        data = result["data"]
        settings = list(data.get("settings", {}))
        rows = []
        for workload, entry in data.get("summary", {}).items():
            spec = entry.get("spec", {})
            shape = "x".join(str(d) for d in spec["shape"]) if spec.get("shape") else "zoo's"
            what = f"{spec.get('mode', DASH)}, N={spec.get('members', DASH)}, B={spec.get('batch', DASH)}, {shape}"
            rows.append([workload, what] + [_allocator_cell(entry.get("settings", {}).get(name)) for name in settings])
        caption = source_line(result) + " Cells: peak MB / page faults per step / ms per step."
        if data.get("note"):
            caption += f" Note: {data['note']}"
        parts.append(caption)
        parts.append(table(["workload", "run"] + settings, rows))
        parts.append("Settings (`mallopt` calls): " + "; ".join(
            f"`{name}`: " + (", ".join(f"{c['parameter']}={c['value'] >> 20} MiB" if c["value"] >= 1 << 20
                                       else f"{c['parameter']}={c['value']}" for c in calls) or "none")
            for name, calls in data.get("settings", {}).items()) + ".")
    return "\n\n".join(parts) if len(parts) > 1 else ""


# ---- scaling out: a sharded ensemble ---------------------------------------------------------------------------

def fmt_bytes(value) -> str:
    """Bytes with three significant figures and a decimal unit (B, kB, MB, GB)."""
    if not isinstance(value, (int, float)):
        return DASH
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= scale:
            return f"{fmt_ms(value / scale)} {unit}"
    return f"{value:.0f} B"


SHARDED_CALLS = (("forward_mean_probs", "forward, `mean_probs` (also `mean`, `softmax_of_mean`)"),
                 ("forward_log_mean_probs", "forward, `log_mean_probs`"),
                 ("forward_vote", "forward, `vote`"),
                 ("forward_stats", "`stats()`"),
                 ("forward_gather_logits", "forward, `none` (gathers the logits)"),
                 ("train_step_members_only", "training step (members only)"),
                 ("train_step_data_parallel_whole_ensemble", "training step, data parallel over the whole ensemble"))


def _counted(count, noun: str, plural: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count if isinstance(count, int) else DASH} {plural}"


def _run_name(point: dict) -> str:
    if point.get("group") is False:
        return f"1 process, no group, {_counted(point.get('threads'), 'thread', 'threads')}"
    return f"{_counted(point.get('processes'), 'process', 'processes')} in a gloo group, 1 thread each"


def sharded_time_table(result: dict) -> str:
    """The timed points of one sharded_ensemble.py file: median ms of a forward and a training step per run."""
    points = [p for p in result["data"].get("points", []) if "forward_ms" in p]
    baseline = next((p for p in points if p.get("group") is False and p.get("threads") == 1), None)
    rows = [[_run_name(p), " + ".join(map(str, p.get("member_blocks") or [])) or DASH, fmt_ms(p.get("forward_ms")),
             fmt_ms(p.get("train_step_ms")),
             fmt_ratio(_ratio(_get(baseline, "forward_ms"), p.get("forward_ms"))),
             fmt_ratio(_ratio(_get(baseline, "train_step_ms"), p.get("train_step_ms")))] for p in points]
    config = result["data"].get("config", {})
    caption = (f"{source_line(result)} {config.get('members', DASH)} x {config.get('model', DASH)}, batch "
               f"{config.get('batch', DASH)}, forward with `{config.get('forward_reduction', DASH)}`, "
               f"{config.get('optimizer', DASH)} steps; median ms (a group's: the slowest rank's), and the speedup "
               f"over one process with one thread.")
    return caption + "\n\n" + table(["run", "members per rank", "forward (ms)", "training step (ms)",
                                      "forward speedup", "step speedup"], rows)


def sharded_bytes_table(result: dict) -> str:
    """The bytes each rank sends per call, counted in every group of one sharded_ensemble.py file."""
    groups = [p for p in result["data"].get("points", []) if p.get("group") and "bytes_counted" in p]
    rows = []
    for name, label in SHARDED_CALLS:
        counted = [_get(p, "bytes_counted", name) for p in groups]
        collectives = next((c.get("collectives") for c in counted if isinstance(c, dict)), None)
        cells = []
        for point, entry in zip(groups, counted):
            if isinstance(entry, dict):
                cells.append(f"{fmt_bytes(entry.get('payload_bytes'))} / {fmt_bytes(entry.get('sent_bytes'))}")
            else:  # not run: the formula's bytes
                cells.append(f"{fmt_bytes(_get(point, 'bytes_formula', 'payload_bytes', name))} / "
                             f"{fmt_bytes(_get(point, 'bytes_formula', 'sent_bytes', name))} (formula)")
        rows.append([label, collectives if collectives is not None else DASH] + cells)
    config = result["data"].get("config", {})
    caption = (f"{source_line(result)} Bytes per rank and call, {config.get('members', DASH)} members, batch "
               f"{config.get('batch', DASH)}, {config.get('classes', DASH)} classes: payload (the tensor a rank "
               f"contributes) / sent (by the ring algorithms' count), counted around each call.")
    return caption + "\n\n" + table(["call", "collectives"] + [_counted(p.get("processes"), "process", "processes")
                                                                for p in groups], rows)


def sharded_size_table(result: dict) -> str:
    """Bytes each rank sends per forward, sharded against gathering the logits, per N, B and K."""
    entries = result["data"].get("bytes_versus_size", [])
    rows = [[e.get("members", DASH), e.get("batch", DASH), e.get("classes", DASH), fmt_bytes(e.get("sharded_bytes")),
             fmt_bytes(e.get("gather_logits_bytes")), fmt_ratio(e.get("ratio"))] for e in entries]
    processes = entries[0].get("processes", DASH) if entries else DASH
    caption = (f"{source_line(result)} Bytes each of {processes} ranks sends per forward, by the formula the counts "
               f"above check: the sharded `mean_probs` (one all-reduce of [B, K]) against gathering every member's "
               f"logits (`reduction=\"none\"`, one all-gather).")
    return caption + "\n\n" + table(["N", "B", "K", "sharded", "gathering logits", "ratio"], rows)


def sharded_estimate_table(result: dict) -> str:
    """Communication per call on one node of 8 GPUs, estimated from cited NCCL bus bandwidths."""
    data = result["data"]
    rows = [[e.get("workload", DASH), e.get("fabric", DASH), fmt_ms(e.get("forward_sharded_ms")),
             fmt_ms(e.get("forward_log_mean_probs_ms")), fmt_ms(e.get("forward_gather_logits_ms")),
             fmt_ms(e.get("train_step_data_parallel_ms"))]
            for e in data.get("estimate_8_gpus", [])]
    figures = data.get("nccl_figures", {})
    sources = "; ".join(f"{fabric}: {source}" for fabric, source in (figures.get("busbw_sources") or {}).items())
    caption = (f"{source_line(result)} Estimated communication ms per call on 8 GPUs: "
               f"{figures.get('small_message_latency_us', DASH)} us per collective (an assumption) plus the bytes a "
               f"rank sends over the bus bandwidth (nccl-tests' busbw, defined in "
               f"{figures.get('busbw_definition', DASH)}). Bandwidths: {sources or DASH}. A sharded training step "
               f"sends no gradient; data parallelism over the whole ensemble all-reduces every member's gradients.")
    return caption + "\n\n" + table(["workload", "GPUs", "forward, sharded (ms)", "forward, `log_mean_probs` (ms)",
                                      "forward, gathering logits (ms)", "step, data parallel (ms)"], rows)


def section_scaling_out(results: list[dict]) -> str:
    parts = [("A sharded ensemble (`fused_ensemble.distributed.ShardedEnsemble`, `bench/sharded_ensemble.py`): its "
              "members split over processes, every reduction combined from per-rank statistics of the result's "
              "size ([Scaling out](guides/scaling-out.md)).")]
    for result in _select(results, "sharded"):
        if any("forward_ms" in p for p in result["data"].get("points", [])):
            parts.append(sharded_time_table(result))
        parts.append(sharded_bytes_table(result))
        parts.append(sharded_size_table(result))
        parts.append(sharded_estimate_table(result))
    return "\n\n".join(parts) if len(parts) > 1 else ""


# ---- (f) headline --------------------------------------------------------------------------------------------------

# The files the README's headline quotes: the latest runs timed with every method taking turns (earlier CPU runs timed
# each method in a block and drifted by up to 40%). Each row takes the best ratio in its file; edit this list when
# newer results land.
HEADLINE = (
    ("h100", "ensemble-activations-freed", "inference", "B <= 8"),
    ("h100", "ensemble-activations-freed", "inference", "B >= 64"),
    ("h100", "train-interleaved", "training", None),
    ("cpu-2core", "ensemble-compile-settled-allocator", "inference", None),
    ("cpu-2core", "train-interleaved", "training", None),
)
BATCH_FILTERS = {None: lambda batch: True, "B <= 8": lambda batch: batch <= 8, "B >= 64": lambda batch: batch >= 64}


def _inference_candidates(result: dict, batch_filter) -> list[tuple]:
    """(optimized vs best loop, what, optimized ms, best loop ms) per measured point."""
    found = []
    for p in result["data"].get("points", []):
        if "error" in p or not isinstance(p.get("batch"), int) or not batch_filter(p["batch"]):
            continue
        ms = p.get("ms", {})
        loops = [t for t in (ms.get("loop"), ms.get("loop_graph")) if isinstance(t, (int, float))]
        baseline = "the faster of loop and loop + CUDA graph" if "loop_graph" in ms else "the member loop"
        what = (f"inference, {p.get('model')} {p.get('dtype')} N={p.get('members')} B={p.get('batch')}: "
                f"optimize(x) vs {baseline}")
        found.append((p.get("speedup_optimized_vs_best_loop"), what, ms.get("optimized"),
                      min(loops) if loops else None))
    return found


def _training_candidates(result: dict) -> list[tuple]:
    """(loop's fastest / fused's fastest, what, fused ms, loop ms) per N and batch: each implementation in the layout
    and precision where it runs fastest, so a slow loop configuration does not flatter the ratio."""
    by_size: dict = {}
    for p in result["data"].get("points", []):
        by_size.setdefault((p.get("members"), p.get("batch_per_member")), []).append(p)
    found = []
    for (members, batch), points in by_size.items():
        best = {}
        for name in ("loop", "fused"):
            timed = [(_get(p, "ms", name), p) for p in points if isinstance(_get(p, "ms", name), (int, float))]
            if timed:
                best[name] = min(timed, key=lambda t: t[0])
        if len(best) < 2:
            continue
        (fused_ms, fused_point), (loop_ms, loop_point) = best["fused"], best["loop"]
        what = (f"training step, N={members}, B={batch} per member: fused "
                f"({fused_point.get('memory_format')}, {fused_point.get('precision')}) vs member loop "
                f"({loop_point.get('memory_format')}, {loop_point.get('precision')})")
        found.append((loop_ms / fused_ms, what, fused_ms, loop_ms))
    return found


def section_headline(results: list[dict]) -> str:
    rows = []
    for machine, workload, kind, batch in HEADLINE:
        matches = [r for r in results if r["machine"] == machine and r["workload"] == workload]
        if not matches:
            continue
        result = matches[0]
        candidates = (_inference_candidates(result, BATCH_FILTERS[batch]) if kind == "inference"
                      else _training_candidates(result))
        candidates = [c for c in candidates if isinstance(c[0], (int, float))]
        if not candidates:
            continue
        ratio, what, ours, loop = max(candidates, key=lambda c: c[0])
        env = result["data"].get("environment", {})
        rows.append([what, f"`{machine}` ({env.get('card') or DASH})", fmt_ms(ours), fmt_ms(loop), fmt_ratio(ratio),
                     env.get("date") or result["date"], f"`{result['path']}`"])
    if not rows:
        return ""
    intro = ("Fused against the member loop: the best ratio in each of the latest result files timed with the methods "
             "taking turns (ms, median).")
    return intro + "\n\n" + table(["measurement", "machine", "ours (ms)", "loop (ms)", "speedup", "date", "source"],
                                   rows)


# ---- entry points ------------------------------------------------------------------------------------------------

SECTION_BUILDERS = {
    "headline": section_headline,
    "inference-h100": lambda results: section_inference(results, "h100"),
    "inference-cpu": lambda results: section_inference(results, "cpu-2core"),
    "bench-cli-cpu": section_bench_cli,
    "reduction-h100": section_reduction_gpu,
    "reduction-cpu": section_reduction_cpu,
    "training": section_training,
    "training-profile": section_training_profile,
    "optimizer": section_optimizer,
    "digits": section_digits,
    "calibration": section_calibration,
    "deployment-cpu": section_deployment,
    "cpu-allocator": section_cpu_allocator,
    "scaling-out": section_scaling_out,
}


def sections(results_dir: Path | str | None = None) -> dict[str, str]:
    """Section name -> Markdown, for every section (an empty string where no result file feeds it)."""
    results = load_results(results_dir)
    return {name: build(results) for name, build in SECTION_BUILDERS.items()}


FILLED_BLOCK = re.compile(r"(<!-- report:(?P<name>[a-z0-9-]+) -->\n)(?P<body>.*?)(<!-- /report:(?P=name) -->)",
                          re.DOTALL)
"""A generated block of a Markdown file that is read as it is (README.md): the section NAME between the markers."""


def fill(text: str, built: dict[str, str]) -> str:
    """``text`` with every block between ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->`` replaced by section
    NAME of ``built``."""
    return FILLED_BLOCK.sub(lambda m: m.group(1) + built[m.group("name")].strip() + "\n" + m.group(4), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--section", choices=sorted(SECTION_BUILDERS), help="print one section")
    what.add_argument("--all", action="store_true", help="print every section")
    what.add_argument("--list", action="store_true", help="print the section names")
    what.add_argument("--fill", metavar="PATH", help="rewrite the generated blocks of a Markdown file (README.md)")
    parser.add_argument("--results", default=None, help="results folder (default: bench/results)")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(SECTION_BUILDERS))
        return 0
    built = sections(args.results)
    if args.fill:
        path = Path(args.fill)
        path.write_text(fill(path.read_text(), built))
        return 0
    if args.section:
        print(built[args.section])
        return 0
    print("\n\n".join(f"## {name}\n\n{text}" for name, text in built.items() if text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
