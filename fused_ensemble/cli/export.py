"""``python -m fused_ensemble export``: N members of a benchmark-zoo model (random, or read from checkpoints) written
as a safetensors checkpoint, an ONNX file or an AOTInductor package, then read back and checked against the eager
module."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from fused_ensemble.cli.command_errors import CommandError, report
from fused_ensemble.cli.models import MODELS, build_model, input_shape
from fused_ensemble.cli.workloads import randomize_state
from fused_ensemble.deploy.checkpoint import FORMAT, load, read_metadata, save
from fused_ensemble.deploy.exportable import OUTPUTS, EnsembleOutputs
from fused_ensemble.deploy.onnx_export import INPUT_NAME, OPSET, export_onnx
from fused_ensemble.deploy.pt2_export import export_pt2
from fused_ensemble.deploy.safetensors_files import looks_like_safetensors
from fused_ensemble.fused import FusedEnsemble
from fused_ensemble.ops.reductions import REDUCTIONS

FORMATS = {"safetensors": ".safetensors", "onnx": ".onnx", "pt2": ".pt2"}
PREDICT_OUTPUTS = ("probs", "prediction", "confidence", "entropy", "mutual_info")
"""What ``export`` puts in ONNX files and packages by default: what ``predict`` prints."""
TOLERANCE = 1e-5
"""Largest absolute difference from the eager module that the check accepts for float32 artifacts."""


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, choices=sorted(MODELS), help="member architecture (benchmark zoo)")
    parser.add_argument("--members", type=int, default=None,
                        help="number of members N (random weights); with --checkpoints, their number")
    parser.add_argument("--checkpoints", nargs="+", default=None, metavar="FILE",
                        help="one checkpoint per member (safetensors, or a torch state_dict file read with "
                             "weights_only=True), or one file written by fused_ensemble.save")
    parser.add_argument("--reduction", default=None, choices=REDUCTIONS,
                        help="the ensemble's reduction, its \"output\" (default: a checkpoint file's, else "
                             "mean_probs)")
    parser.add_argument("--optimize", action="store_true",
                        help="export optimize(x) of the ensemble (onnx and pt2 only; tunes on the example batch)")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS), dest="artifact_format",
                        help="safetensors (checkpoint), onnx (ONNX Runtime) or pt2 (AOTInductor package)")
    parser.add_argument("--out", required=True, metavar="PATH", help="the file to write (.safetensors, .onnx, .pt2)")
    parser.add_argument("--outputs", nargs="+", default=list(PREDICT_OUTPUTS), choices=OUTPUTS, metavar="NAME",
                        help=f"onnx/pt2 outputs, from {', '.join(OUTPUTS)} (default: {' '.join(PREDICT_OUTPUTS)}: "
                             f"what predict prints)")
    parser.add_argument("--batch", type=int, default=2, help="example batch size used to export and check (default 2)")
    parser.add_argument("--static-batch", action="store_true",
                        help="onnx/pt2 take the example's batch size only (default: any batch size)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random members and example inputs")


def _check_arguments(args: argparse.Namespace) -> None:
    suffix = FORMATS[args.artifact_format]
    if not args.out.endswith(suffix):
        raise CommandError(f"--out {args.out!r} must end with {suffix} for --format {args.artifact_format}")
    if args.batch < 1:
        raise CommandError(f"--batch must be >= 1, got {args.batch}")
    if args.artifact_format == "safetensors" and args.optimize:
        raise CommandError("--optimize applies to onnx and pt2: an optimized ensemble is tuned for one process, the "
                           "safetensors checkpoint stores the ensemble itself")
    if args.checkpoints is None:
        if args.members is None or args.members < 1:
            raise CommandError("give --members N (>= 1) for random members, or --checkpoints FILE ...")
    elif args.members is not None and len(args.checkpoints) > 1 and args.members != len(args.checkpoints):
        raise CommandError(f"--members {args.members} but {len(args.checkpoints)} checkpoint files were given")


def _is_ensemble_checkpoint(path: Path) -> bool:
    return looks_like_safetensors(path) and (read_metadata(path) or {}).get("format") == FORMAT


def build_ensemble(args: argparse.Namespace) -> FusedEnsemble:
    """The ensemble to export, in eval mode: random members, or the members of the checkpoint files."""
    def build_member():
        return build_model(args.model)

    if args.checkpoints is None:
        generator = torch.Generator().manual_seed(args.seed)
        torch.manual_seed(args.seed)
        members = [randomize_state(build_member(), generator) for _ in range(args.members)]
        return FusedEnsemble(members, reduction=args.reduction or "mean_probs").eval()
    paths = [Path(p) for p in args.checkpoints]
    try:
        if len(paths) == 1 and paths[0].is_file() and _is_ensemble_checkpoint(paths[0]):
            fused = load(paths[0], build_member)
            if args.members is not None and args.members != fused.num_members:
                raise CommandError(f"--members {args.members} but {paths[0]} holds {fused.num_members} members")
            fused.reduction = args.reduction or fused.reduction
        else:
            fused = FusedEnsemble.from_checkpoints(paths, build_member, reduction=args.reduction or "mean_probs")
    except (ValueError, TypeError, OSError) as error:
        raise CommandError(str(error)) from None
    return fused.eval()


def _size(path: Path) -> int:
    data = path.with_name(path.name + ".data")  # ONNX weights over 2 GB live beside the file
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _max_difference(actual, expected) -> float:
    worst = 0.0
    for a, e in zip(actual, expected):
        a, e = torch.as_tensor(np.asarray(a)).double(), e.detach().cpu().double()
        if a.shape != e.shape:
            return float("inf")
        if a.numel():
            worst = max(worst, float((a - e).abs().max()))
    return worst


def _as_tuple(value) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def _check_batches(args: argparse.Namespace) -> list[int]:
    return [args.batch] if args.static_batch else [args.batch, args.batch + 3]


def check_safetensors(path: Path, fused: FusedEnsemble, x: torch.Tensor, model: str) -> str:
    reloaded = load(path, lambda: build_model(model)).eval()
    with torch.no_grad():
        same = torch.equal(reloaded(x), fused(x))
    same_tensors = all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), fused.state_dict().values()))
    if not (same and same_tensors):
        raise RuntimeError(f"{path}: the reloaded ensemble differs from the one that was saved")
    return f"reloaded with fused_ensemble.load: tensors and outputs on a batch of {x.shape[0]} equal bit for bit"


def check_artifact(args: argparse.Namespace, path: Path, module, inputs: list[torch.Tensor]) -> str:
    """Runs the artifact on each input batch against the eager module; raises if an output differs by more than
    ``TOLERANCE``."""
    reference = EnsembleOutputs(module, args.outputs)
    if args.artifact_format == "onnx":
        import onnxruntime

        runtime = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run(x):
            return runtime.run(None, {INPUT_NAME: x.cpu().numpy()})
        what = "ONNX Runtime"
    else:
        runner = torch._inductor.aoti_load_package(str(path))

        def run(x):
            return _as_tuple(runner(x))
        what = "the AOTInductor package"
    differences = []
    for x in inputs:
        with torch.no_grad():
            expected = _as_tuple(reference(x))
        differences.append(_max_difference(run(x), expected))
    worst = max(differences)
    batches = " and ".join(str(x.shape[0]) for x in inputs)
    verdict = f"{what} vs the eager module on batches of {batches}: max |difference| {worst:.1e}"
    if not worst <= TOLERANCE:
        raise RuntimeError(f"{verdict} > {TOLERANCE:.0e}")
    return verdict + f" (<= {TOLERANCE:.0e})"


def run_export(args: argparse.Namespace) -> dict:
    _check_arguments(args)
    fused = build_ensemble(args)
    out = Path(args.out)
    torch.manual_seed(args.seed)
    inputs = [torch.randn(batch, *input_shape(args.model)) for batch in _check_batches(args)]
    if args.artifact_format == "safetensors":
        save(fused, out)
        check = check_safetensors(out, fused, inputs[0], args.model)
        what = f"safetensors checkpoint, {fused.num_members} x {args.model}, reduction {fused.reduction}"
    else:
        module = fused.optimize(inputs[0]) if args.optimize else fused
        try:
            if args.artifact_format == "onnx":
                export_onnx(module, inputs[0], out, dynamic_batch=not args.static_batch, outputs=args.outputs)
                what = f"ONNX opset {OPSET}"
            else:
                export_pt2(module, inputs[0], out, dynamic_batch=not args.static_batch, outputs=args.outputs)
                what = "AOTInductor package (CPU)"
        except ValueError as error:
            raise CommandError(str(error)) from None
        what += (f", {fused.num_members} x {args.model}{' optimized' if args.optimize else ''}, outputs "
                 f"{', '.join(args.outputs)}, {'static' if args.static_batch else 'dynamic'} batch")
        check = check_artifact(args, out, module, inputs)
    size = _size(out)
    print(f"wrote {out} ({size / 1e6:.1f} MB): {what}")
    print(f"check: {check}")
    return {"path": str(out), "bytes": size, "format": args.artifact_format, "check": check}


def main_export(args: argparse.Namespace) -> int:
    try:
        run_export(args)
    except CommandError as error:
        return report("export", error)
    return 0
