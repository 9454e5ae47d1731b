"""The command line: ``python -m fused_ensemble {bench,train} ...`` (also installed as ``fused-ensemble``), with the
benchmark model zoo (``models``), workloads (``workloads``), plots and the environment that results record.
The library never imports this package."""

from __future__ import annotations

import argparse

from fused_ensemble.cli.bench import add_bench_arguments, main_bench
from fused_ensemble.cli.train import add_train_arguments, run_train

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fused-ensemble",
        description="Run and train N networks of one architecture as one fused network.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{bench,train}")
    add_bench_arguments(commands.add_parser(
        "bench", help="time the member loop, torch.func vmap and FusedEnsemble on one workload",
        description="Time the member loop, torch.func vmap and FusedEnsemble on one workload of random members, "
                    "after checking that they agree."))
    add_train_arguments(commands.add_parser(
        "train", help="train N members as one fused network and evaluate them",
        description="Train N members as one FusedEnsemble (per-member hyperparameters) and report per-member and "
                    "ensemble metrics."))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        return main_bench(args)
    run_train(args)
    return 0
