"""Command line: `python -m fused_ensemble {bench,train} ...` (also installed as `fused-ensemble`)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fused-ensemble", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    from fused_ensemble.bench_cli import add_bench_arguments

    add_bench_arguments(commands.add_parser(
        "bench", help="time the member loop, torch.func vmap and FusedEnsemble on one workload"))
    from fused_ensemble.train import add_train_arguments

    add_train_arguments(commands.add_parser("train", help="train N members as one fused network"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        from fused_ensemble.bench_cli import main_bench

        return main_bench(args)
    from fused_ensemble.train import run_train

    run_train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
