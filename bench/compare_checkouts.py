"""Times one benchmark in two checkouts of the project, taking turns, in one run: did a change move the numbers?

Each round runs the benchmark once in the "before" checkout and once in the "after" one (alternating which goes
first), each in a fresh process with that checkout first on PYTHONPATH (each checkout needs its compiled extension
built in place: ``python setup.py build_ext --inplace``, and a ``fused_ensemble/kernels`` link to ``../kernels``).
A machine that slows down or speeds up during the run then moves both alike. The benchmark writes JSON to the path
given for ``{json}`` in its command: ``python -m fused_ensemble bench ... --json {json}`` or a pytest-benchmark
suite with ``--benchmark-json={json}``. Per method (or benchmark), the median over rounds of each run's median ms and
the ratio after / before are printed and written::

    python bench/compare_checkouts.py --before ../old --after . --rounds 3 --json out.json -- \\
        python -m fused_ensemble bench --model resnet18-cifar --members 4 --batch 16 --device cpu --json {json}
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile


def medians_ms(result: dict) -> dict[str, float]:
    """Median ms per method (the bench command's JSON) or per benchmark (pytest-benchmark's JSON)."""
    if "results" in result:
        return {name: row["ms"] for name, row in result["results"].items()}
    return {bench["name"]: bench["stats"]["median"] * 1e3 for bench in result["benchmarks"]}


def run_once(checkout: str, command: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "result.json")
        environment = dict(os.environ, PYTHONPATH=os.path.abspath(checkout))
        argv = [path if word == "{json}" else word.replace("{json}", path) for word in command]
        subprocess.run(argv, cwd=checkout, env=environment, check=True, stdout=subprocess.DEVNULL)
        with open(path) as f:
            return medians_ms(json.load(f))


def _commit(checkout: str) -> str | None:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True)
    return done.stdout.strip() or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the checkout before the change")
    parser.add_argument("--after", required=True, help="the checkout after the change")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the comparison here")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the benchmark command, with {json}")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the benchmark command after --")
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for round_index in range(args.rounds):
        order = ("before", "after") if round_index % 2 == 0 else ("after", "before")
        for which in order:
            runs[which].append(run_once(getattr(args, which), command))
            print(f"round {round_index + 1}/{args.rounds}: {which} done", flush=True)
    names = [name for name in runs["before"][0] if all(name in run for run in runs["before"] + runs["after"])]
    rows = {}
    for name in names:
        before = statistics.median(run[name] for run in runs["before"])
        after = statistics.median(run[name] for run in runs["after"])
        rows[name] = {"before_ms": before, "after_ms": after, "after_over_before": after / before,
                      "before_runs_ms": [run[name] for run in runs["before"]],
                      "after_runs_ms": [run[name] for run in runs["after"]]}
        print(f"{name:<60} before {before:10.3f} ms  after {after:10.3f} ms  after/before {after / before:5.3f}")
    if args.json:
        sys.path.insert(0, os.path.abspath(args.after))
        from fused_ensemble.cli.environment import environment_info

        result = {"environment": environment_info("cpu"), "before_commit": _commit(args.before),
                  "after_commit": _commit(args.after), "rounds": args.rounds, "benchmark": shlex.join(command),
                  "results": rows}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
