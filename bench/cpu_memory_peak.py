"""Peak memory and step time of fused ensembles on the CPU under glibc malloc settings (fused_ensemble.cpu_memory).

Each (workload, setting) pair runs in a fresh process: it builds the fused ensemble, makes the setting's ``mallopt``
calls where the package would make its own (after the model is built, before the first forward), takes the resident
size as the baseline and resets the peak (``/proc/self/clear_refs``), then runs warm-up and timed steps. It reports
the peak resident size over the baseline (``ru_maxrss``), the resident size after the steps (``/proc/self/statm``),
minor page faults per step and the median ms per step. The children run with ``FUSED_ENSEMBLE_KEEP_CPU_MEMORY=0``, so
the package leaves glibc alone and the setting alone is measured. Rounds run every pair once, settings in a rotated
order, so that a shared machine's drift spreads over all settings; the result takes medians over rounds.

    python bench/cpu_memory_peak.py --rounds 2 --json bench/results/cpu-2core/cpu-allocator-<date>.json
    python bench/cpu_memory_peak.py --workloads small-cnn-64-32x32-train --settings default,thresholds-1g \
        --rounds 1 --append --json PATH    # adds these runs to the file's
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -2, -3, -8
MIB = 1 << 20

# name -> mallopt calls, made in this order (the mmap threshold first: it turns glibc's adaptive thresholds off).
SETTINGS: dict[str, list[tuple[int, int]]] = {
    "default": [],
    "thresholds-1g": [(M_MMAP_THRESHOLD, 1024 * MIB), (M_TRIM_THRESHOLD, 1024 * MIB)],
    "thresholds-1g-arena1": [(M_MMAP_THRESHOLD, 1024 * MIB), (M_TRIM_THRESHOLD, 1024 * MIB), (M_ARENA_MAX, 1)],
    "mmap-1g": [(M_MMAP_THRESHOLD, 1024 * MIB)],
    "mmap-1g-top-pad-64m": [(M_MMAP_THRESHOLD, 1024 * MIB), (M_TOP_PAD, 64 * MIB)],
    "thresholds-64m": [(M_MMAP_THRESHOLD, 64 * MIB), (M_TRIM_THRESHOLD, 128 * MIB)],
    "thresholds-256m": [(M_MMAP_THRESHOLD, 256 * MIB), (M_TRIM_THRESHOLD, 512 * MIB)],
}
SETTING_NAMES = {M_TRIM_THRESHOLD: "M_TRIM_THRESHOLD", M_TOP_PAD: "M_TOP_PAD", M_MMAP_THRESHOLD: "M_MMAP_THRESHOLD",
                 M_ARENA_MAX: "M_ARENA_MAX"}

# name -> what to build: a model of fused_ensemble.cli.models (or "small_cnn"), inference or a training step, N, B,
# the input shape of one sample (default: the zoo's), warm-up steps (default WARMUP_STEPS) and timed steps.
WORKLOADS: dict[str, dict] = {
    "mlp-infer": dict(model="mlp", mode="inference", members=8, batch=32, steps=30),
    "mlp-train": dict(model="mlp", mode="training", members=8, batch=32, steps=30),
    "lenet-infer": dict(model="lenet", mode="inference", members=8, batch=32, steps=20),
    "lenet-train": dict(model="lenet", mode="training", members=8, batch=32, steps=20),
    "resnet18-cifar-infer": dict(model="resnet18-cifar", mode="inference", members=8, batch=1, steps=6),
    "resnet18-cifar-train": dict(model="resnet18-cifar", mode="training", members=4, batch=2, steps=4),
    "vit-cifar-infer": dict(model="vit-cifar", mode="inference", members=4, batch=2, steps=6),
    "vit-cifar-train": dict(model="vit-cifar", mode="training", members=4, batch=2, steps=4),
    # The ImageNet models at 112x112 instead of 224x224 (a quarter of the time; the weights and their stacks are the
    # same), one warm-up step.
    **{f"{model}-{short}": dict(model=model, mode=mode, members=members, batch=batch, shape=(3, 112, 112), warmup=1,
                                steps=3)
       for model, members, batch in (("resnet18", 4, 1), ("resnet50", 2, 1), ("vgg11_bn", 2, 1),
                                     ("mobilenet_v2", 4, 2))
       for short, mode in (("infer", "inference"), ("train", "training"))},
    "small-cnn-64-8x8-train": dict(model="small_cnn", mode="training", members=64, batch=32, shape=(1, 8, 8),
                                   steps=6),
    "small-cnn-64-32x32-train": dict(model="small_cnn", mode="training", members=64, batch=32, shape=(3, 32, 32),
                                     warmup=1, steps=2),
}
WARMUP_STEPS = 2


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _minor_faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _build_step(spec: dict):
    import torch

    from fused_ensemble import FusedEnsemble
    from fused_ensemble.cli.models import build_model, input_shape, small_cnn

    from train_steps import fused_step

    torch.manual_seed(0)
    shape = tuple(spec.get("shape") or input_shape(spec["model"]))
    if spec["model"] == "small_cnn":
        members = [small_cnn(in_channels=shape[0]) for _ in range(spec["members"])]
    else:
        members = [build_model(spec["model"], 10) for _ in range(spec["members"])]
    if spec["mode"] == "inference":
        fused = FusedEnsemble(members, reduction="mean_probs").eval()
        x = torch.randn(spec["batch"], *shape)

        def step():
            with torch.no_grad():
                fused(x)
        return step
    step = fused_step([m.train() for m in members])
    x = torch.randn(spec["members"], spec["batch"], *shape)
    y = torch.randint(0, 10, (spec["members"], spec["batch"]))
    return lambda: step(x, y)


def run_child(workload: str, setting: str) -> dict:
    """One measurement in this (fresh) process; see the module docstring."""
    import ctypes
    import gc

    spec = WORKLOADS[workload]
    step = _build_step(spec)
    gc.collect()
    libc = ctypes.CDLL(None)
    accepted = [bool(libc.mallopt(ctypes.c_int(parameter), ctypes.c_int(value)))
                for parameter, value in SETTINGS[setting]]
    baseline = _resident_bytes()
    try:
        with open("/proc/self/clear_refs", "w") as f:  # resets the peak (ru_maxrss) to the current resident size
            f.write("5")
        peak_reset = True
    except OSError:
        peak_reset = False
    peak_before = _peak_bytes()
    faults = _minor_faults()
    warmup = spec.get("warmup", WARMUP_STEPS)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    faults = _minor_faults() - faults
    peak = _peak_bytes()
    return {"workload": workload, "setting": setting, "mallopt_accepted": all(accepted), "peak_reset": peak_reset,
            "baseline_mb": baseline / MIB, "peak_increase_mb": (peak - (baseline if peak_reset else peak_before)) / MIB,
            "resident_after_increase_mb": (_resident_bytes() - baseline) / MIB,
            "minor_faults_per_step": faults / (warmup + spec["steps"]),
            "ms_per_step": statistics.median(times), "times_ms": times}


def run_in_subprocess(workload: str, setting: str, timeout_s: float) -> dict:
    environment = dict(os.environ, FUSED_ENSEMBLE_KEEP_CPU_MEMORY="0")
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX",
                 "GLIBC_TUNABLES"):
        environment.pop(name, None)
    command = [sys.executable, os.path.abspath(__file__), "--child", workload, setting]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=timeout_s,
                              check=False)
    except subprocess.TimeoutExpired:
        return {"workload": workload, "setting": setting, "error": f"timed out after {timeout_s:.0f} s"}
    if done.returncode != 0:
        return {"workload": workload, "setting": setting,
                "error": (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> dict:
    """workload -> setting -> medians over the runs, with each setting's ratios to glibc's default."""
    workloads = [w for w in WORKLOADS if any(r["workload"] == w for r in runs)]
    settings = [s for s in SETTINGS if any(r["setting"] == s for r in runs)]
    summary = {}
    for workload in workloads:
        by_setting = {}
        for setting in settings:
            done = [r for r in runs if r["workload"] == workload and r["setting"] == setting and "error" not in r]
            if not done:
                continue
            by_setting[setting] = {key: statistics.median(r[key] for r in done)
                                   for key in ("peak_increase_mb", "resident_after_increase_mb",
                                               "minor_faults_per_step", "ms_per_step", "baseline_mb")}
            by_setting[setting]["runs"] = len(done)
        default = by_setting.get("default")
        if default:
            for values in by_setting.values():
                values["peak_vs_default"] = values["peak_increase_mb"] / max(default["peak_increase_mb"], 1e-9)
                values["speedup_vs_default"] = default["ms_per_step"] / values["ms_per_step"]
        summary[workload] = {"spec": WORKLOADS[workload], "settings": by_setting}
    return summary


def _write(path: str, environment: dict, commands: list[str], runs: list[dict]) -> None:
    used = {r["setting"] for r in runs}
    output = {"environment": environment, "commands": commands,
              "settings": {name: [{"parameter": SETTING_NAMES[p], "value": v} for p, v in calls]
                           for name, calls in SETTINGS.items() if name in used},
              "warmup_steps": WARMUP_STEPS, "summary": summarize(runs), "runs": runs}
    with open(path, "w") as f:
        json.dump(output, f, indent=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated names (default: all)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names (default: all)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per child process")
    parser.add_argument("--json", default=None, help="write the results here (after every run)")
    parser.add_argument("--append", action="store_true",
                        help="add to the runs already in --json (another selection of workloads or settings)")
    parser.add_argument("--child", nargs=2, metavar=("WORKLOAD", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(*args.child)))
        return 0
    workloads, settings = args.workloads.split(","), args.settings.split(",")
    unknown = [w for w in workloads if w not in WORKLOADS] + [s for s in settings if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown workloads or settings: {unknown}")

    from fused_ensemble.cli.environment import environment_info

    environment = environment_info("cpu")
    environment["cpu_allocator"] = ("per setting, made by the child processes (FUSED_ENSEMBLE_KEEP_CPU_MEMORY=0 "
                                    "in each, so the package's own setting is off)")
    runs: list[dict] = []
    commands = [environment["command"]]
    if args.append and args.json and os.path.exists(args.json):
        with open(args.json) as f:
            previous = json.load(f)
        runs, commands = previous["runs"], previous["commands"] + commands
    started = time.time()
    for round_index in range(args.rounds):
        for workload_index, workload in enumerate(workloads):
            shift = (round_index + workload_index) % len(settings)
            for setting in settings[shift:] + settings[:shift]:
                result = run_in_subprocess(workload, setting, args.timeout)
                result.update(command=len(commands) - 1, round=round_index)
                runs.append(result)
                shown = (f"error: {result['error']}" if "error" in result else
                         f"peak +{result['peak_increase_mb']:.0f} MB, resident after "
                         f"+{result['resident_after_increase_mb']:.0f} MB, {result['ms_per_step']:.1f} ms, "
                         f"{result['minor_faults_per_step']:.0f} faults/step")
                print(f"[{time.time() - started:6.0f} s] round {round_index} {workload:26s} {setting:22s} {shown}",
                      flush=True)
                if args.json:  # after every run: an interrupted measurement keeps what it measured
                    _write(args.json, environment, commands, runs)
    print(json.dumps(summarize(runs), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
