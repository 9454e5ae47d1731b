"""The command line: ``python -m fused_ensemble {bench,train,export,predict} ...`` (also installed as
``fused-ensemble``), with the benchmark model zoo (``models``), workloads (``workloads``), plots and the environment
that results record. The library never imports this package."""

from __future__ import annotations

import argparse

from fused_ensemble.cli.bench import add_bench_arguments, main_bench
from fused_ensemble.cli.export import add_export_arguments, main_export
from fused_ensemble.cli.predict import add_predict_arguments, main_predict
from fused_ensemble.cli.train import add_train_arguments, run_train

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fused-ensemble",
        description="Run and train N networks of one architecture as one fused network.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{bench,train,export,predict}")
    add_bench_arguments(commands.add_parser(
        "bench", help="time the member loop, torch.func vmap and FusedEnsemble on one workload",
        description="Time the member loop, torch.func vmap and FusedEnsemble on one workload of random members, "
                    "after checking that they agree."))
    add_train_arguments(commands.add_parser(
        "train", help="train N members as one fused network and evaluate them",
        description="Train N members as one FusedEnsemble (per-member hyperparameters) and report per-member and "
                    "ensemble metrics."))
    add_export_arguments(commands.add_parser(
        "export", help="write N members as a safetensors checkpoint, an ONNX file or an AOTInductor package",
        description="Write N members of a benchmark-zoo model (random, or from checkpoints) as a safetensors "
                    "checkpoint, an ONNX file or an AOTInductor package, then check it against the eager module."))
    add_predict_arguments(commands.add_parser(
        "predict", help="predicted class, probability, entropy and mutual information per sample",
        description="Run an exported ensemble (.safetensors with --model, .onnx or .pt2) on a .npy/.pt tensor or "
                    "image files and print, per sample, the predicted class, its probability, the predictive "
                    "entropy and the mutual information."))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        return main_bench(args)
    if args.command == "export":
        return main_export(args)
    if args.command == "predict":
        return main_predict(args)
    run_train(args)
    return 0
