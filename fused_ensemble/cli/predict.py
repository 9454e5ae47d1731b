"""``python -m fused_ensemble predict ARTIFACT INPUT ...``: the ensemble's prediction and uncertainty per sample,
from a safetensors checkpoint (with ``--model``), an ONNX file or an AOTInductor package.

Inputs are a ``.npy`` file (read with ``allow_pickle=False``), a ``.pt`` file holding one tensor (read with
``torch.load(weights_only=True)``), or image files (read by Pillow, converted to grayscale or RGB as the model takes
them, resized bilinearly to its input size and scaled to [0, 1], with no further normalization). A tensor holds one
sample or a batch of them; floating-point values are cast to the artifact's input dtype.
"""

from __future__ import annotations

import argparse
import json
import zipfile
from pathlib import Path

import numpy as np
import torch

from fused_ensemble.cli.command_errors import CommandError, report
from fused_ensemble.cli.export import PREDICT_OUTPUTS
from fused_ensemble.cli.models import MODELS, build_model, input_shape
from fused_ensemble.deploy.checkpoint import load
from fused_ensemble.deploy.exportable import EnsembleOutputs

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
NEEDED = ("probs", "entropy", "mutual_info")
"""What an artifact must output for ``predict`` (``prediction`` and ``confidence`` follow from ``probs``)."""
CHUNK = 256
"""Samples per call of the artifact."""
ONNX_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64,
               "tensor(bfloat16)": torch.bfloat16}


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", metavar="ARTIFACT",
                        help="a .safetensors checkpoint (with --model), a .onnx file or a .pt2 package")
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="a .npy or .pt tensor ([B, ...] or one sample), or image files (.png, .jpg)")
    parser.add_argument("--model", default=None, choices=sorted(MODELS),
                        help="the member architecture of a .safetensors checkpoint")
    parser.add_argument("--json", action="store_true", help="print the predictions as JSON")


class Predictor:
    """An artifact loaded for prediction: its per-sample input shape and dtype, and a function from an input batch to
    named outputs."""

    def __init__(self, sample_shape: tuple[int | None, ...], dtype: torch.dtype, run, fixed_batch: int | None = None):
        self.sample_shape = sample_shape
        self.dtype = dtype
        self.run = run
        self.fixed_batch = fixed_batch


def _checkpoint_predictor(path: Path, model: str | None) -> Predictor:
    if model is None:
        raise CommandError(f"{path}: a safetensors checkpoint needs --model NAME to build its members")
    try:
        fused = load(path, lambda: build_model(model)).eval()
    except (ValueError, TypeError, OSError) as error:
        raise CommandError(str(error)) from None
    outputs = EnsembleOutputs(fused, PREDICT_OUTPUTS)

    def run(x):
        with torch.no_grad():
            return dict(zip(PREDICT_OUTPUTS, outputs(x)))
    dtype = next(fused.parameters()).dtype
    return Predictor(input_shape(model), dtype, run)


def _check_needed(path: Path, names: list[str]) -> None:
    missing = [name for name in NEEDED if name not in names]
    if missing:
        raise CommandError(f"{path}: its outputs are {', '.join(names)}; predict needs {', '.join(NEEDED)}: export "
                           f"it with outputs including them (python -m fused_ensemble export ... --outputs "
                           f"{' '.join(PREDICT_OUTPUTS)})")


def _onnx_predictor(path: Path) -> Predictor:
    import onnxruntime

    try:
        runtime = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:  # ONNX Runtime raises its own exception types for unreadable files
        raise CommandError(f"{path}: ONNX Runtime cannot load it ({type(error).__name__}: "
                           f"{str(error).strip().splitlines()[0] if str(error).strip() else ''})") from None
    names = [output.name for output in runtime.get_outputs()]
    _check_needed(path, names)
    inputs = runtime.get_inputs()
    if len(inputs) != 1 or inputs[0].type not in ONNX_DTYPES:
        raise CommandError(f"{path}: expected one floating-point input, found "
                           f"{[(i.name, i.type) for i in inputs]}")
    batch, *sample = inputs[0].shape
    input_name = inputs[0].name

    def run(x):
        return dict(zip(names, (torch.from_numpy(np.asarray(a)) for a in
                                runtime.run(None, {input_name: x.numpy()}))))
    return Predictor(tuple(d if isinstance(d, int) else None for d in sample), ONNX_DTYPES[inputs[0].type], run,
                     batch if isinstance(batch, int) else None)


def _pt2_predictor(path: Path) -> Predictor:
    if not zipfile.is_zipfile(path):
        raise CommandError(f"{path}: not an AOTInductor package (not a zip archive)")
    try:
        runner = torch._inductor.aoti_load_package(str(path))
    except Exception as error:  # the loader raises RuntimeError for archives it cannot use
        raise CommandError(f"{path}: not an AOTInductor package that loads here ({type(error).__name__}: "
                           f"{str(error).strip().splitlines()[0] if str(error).strip() else ''})") from None
    metadata = runner.get_metadata()
    if "outputs" not in metadata:
        raise CommandError(f"{path}: the package has no fused_ensemble metadata (was it written by export_pt2?)")
    names = metadata["outputs"].split(",")
    _check_needed(path, names)
    if metadata.get("member_inputs") == "true":
        raise CommandError(f"{path}: the ensemble takes one input per member ([N, B, ...]); predict feeds every "
                           f"member the same samples")
    device = "cuda" if metadata.get("AOTI_DEVICE_KEY", "cpu").startswith("cuda") else "cpu"
    sample_shape = tuple(int(d) for d in metadata["sample_shape"].split(",") if d)
    dtype = getattr(torch, metadata.get("input_dtype", "float32"))

    def run(x):
        result = runner(x.to(device))
        result = result if isinstance(result, (tuple, list)) else (result,)
        return dict(zip(names, (t.cpu() for t in result)))
    return Predictor(sample_shape, dtype, run)


def load_predictor(path: Path, model: str | None) -> Predictor:
    if not path.is_file():
        raise CommandError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _checkpoint_predictor(path, model)
    if suffix == ".onnx":
        return _onnx_predictor(path)
    if suffix == ".pt2":
        return _pt2_predictor(path)
    raise CommandError(f"{path}: unknown artifact type {suffix or '(no suffix)'}; expected .safetensors, .onnx or "
                       f".pt2")


def _read_tensor(path: Path) -> torch.Tensor:
    if path.suffix.lower() == ".npy":
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False))
        except ValueError as error:
            raise CommandError(f"{path}: not a numeric .npy array ({error})") from None
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # weights_only refusals, corrupt archives
        raise CommandError(f"{path}: torch.load(weights_only=True) cannot read it as a tensor "
                           f"({type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''})"
                           ) from None
    if not isinstance(value, torch.Tensor):
        raise CommandError(f"{path}: holds a {type(value).__name__}, expected one tensor")
    return value


def _read_images(paths: list[Path], sample_shape: tuple) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    if len(sample_shape) != 3 or sample_shape[0] not in (1, 3) or None in sample_shape:
        raise CommandError(f"the artifact takes samples of shape {sample_shape}, not images")
    channels, height, width = sample_shape
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image = image.convert("L" if channels == 1 else "RGB").resize((width, height),
                                                                               Image.Resampling.BILINEAR)
                pixels = np.asarray(image, dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError) as error:
            raise CommandError(f"{path}: not an image Pillow can read ({error})") from None
        images.append(torch.from_numpy(pixels).reshape(height, width, channels).permute(2, 0, 1))
    return torch.stack(images)


def read_inputs(paths: list[Path], predictor: Predictor) -> tuple[torch.Tensor, list[str]]:
    """The input batch and a name per sample (the image file, or the index)."""
    for path in paths:
        if not path.is_file():
            raise CommandError(f"{path}: no such file")
    if all(path.suffix.lower() in IMAGE_SUFFIXES for path in paths):
        return _read_images(paths, predictor.sample_shape), [str(path) for path in paths]
    if len(paths) != 1 or paths[0].suffix.lower() not in (".npy", ".pt"):
        raise CommandError(f"INPUT is one .npy or .pt file, or image files ({', '.join(IMAGE_SUFFIXES)}); got "
                           f"{' '.join(map(str, paths))}")
    x = _read_tensor(paths[0])
    if not x.is_floating_point():
        raise CommandError(f"{paths[0]}: holds {x.dtype} values; expected floating-point samples")
    rank = len(predictor.sample_shape)
    if x.dim() == rank:
        x = x.unsqueeze(0)
    fits = x.dim() == rank + 1 and all(e is None or e == d for e, d in zip(predictor.sample_shape, x.shape[1:]))
    if not fits:
        expected = tuple("?" if d is None else d for d in predictor.sample_shape)
        raise CommandError(f"{paths[0]}: shape {tuple(x.shape)}; the artifact takes samples of shape {expected} "
                           f"(one sample, or a batch [B, ...])")
    if x.shape[0] == 0:
        raise CommandError(f"{paths[0]}: holds no samples")
    return x, [str(i) for i in range(x.shape[0])]


def predict(predictor: Predictor, x: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.to(predictor.dtype).contiguous()
    if predictor.fixed_batch is not None and x.shape[0] != predictor.fixed_batch:
        raise CommandError(f"the artifact takes batches of exactly {predictor.fixed_batch} samples (exported with a "
                           f"static batch), got {x.shape[0]}")
    chunk = predictor.fixed_batch or CHUNK
    parts = [predictor.run(x[start:start + chunk]) for start in range(0, x.shape[0], chunk)]
    outputs = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
    confidence, prediction = outputs["probs"].float().max(-1)
    outputs.setdefault("prediction", prediction)
    outputs.setdefault("confidence", confidence)
    return outputs


def format_rows(rows: list[dict]) -> str:
    width = max(len("sample"), *(len(row["sample"]) for row in rows))
    lines = [f"{'sample':<{width}}  {'class':>5}  {'probability':>11}  {'entropy':>8}  {'mutual_info':>11}"]
    for row in rows:
        lines.append(f"{row['sample']:<{width}}  {row['class']:>5}  {row['probability']:>11.4f}  "
                     f"{row['entropy']:>8.4f}  {row['mutual_info']:>11.4g}")
    return "\n".join(lines)


def run_predict(args: argparse.Namespace) -> list[dict]:
    predictor = load_predictor(Path(args.artifact), args.model)
    x, names = read_inputs([Path(p) for p in args.inputs], predictor)
    outputs = predict(predictor, x)
    if outputs["probs"].dim() != 2:
        raise CommandError(f"the ensemble's probabilities have shape {tuple(outputs['probs'].shape)}; predict "
                           f"prints one row per sample of [B, K] class probabilities")
    rows = [{"sample": name, "class": int(outputs["prediction"][i]), "probability": float(outputs["confidence"][i]),
             "entropy": float(outputs["entropy"][i]), "mutual_info": float(outputs["mutual_info"][i])}
            for i, name in enumerate(names)]
    if args.json:
        print(json.dumps({"artifact": args.artifact, "predictions": rows}, indent=2))
    else:
        print(format_rows(rows))
    return rows


def main_predict(args: argparse.Namespace) -> int:
    try:
        run_predict(args)
    except CommandError as error:
        return report("predict", error)
    return 0
