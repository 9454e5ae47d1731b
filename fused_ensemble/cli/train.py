"""``python -m fused_ensemble train``: N members trained as one FusedEnsemble on digits or CIFAR-10, evaluated per
member and as an ensemble, with a JSON summary and a reliability diagram. ``--calibrate`` holds out part of the
training split and fits temperature scaling and conformal prediction sets on it (``fused_ensemble.cli.calibrate``).

Everything the run will write (``--json``, ``--plot``, ``--checkpoint-dir``) and every argument is checked before
training, so a bad path or value costs a second, not the run. With ``--checkpoint-dir DIR`` the run writes
``DIR/checkpoint.pt`` after every epoch (``fused_ensemble.training.checkpoint``: atomic, loaded with
``torch.load(weights_only=True)``); ``--resume`` continues from it, and a run killed and resumed ends with the same
members, bit for bit, as one never interrupted (same machine, same device).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pickle
import sys
import time

import numpy as np
import torch
from torch import nn

from fused_ensemble.cli.calibrate import (
    add_calibration_arguments,
    calibrate,
    calibration_options,
    format_calibration,
    hold_out,
)
from fused_ensemble.cli.models import MODELS, build_model, small_cnn
from fused_ensemble.cli.plots import plot_reliability
from fused_ensemble.cli.run_summary import run_summary
from fused_ensemble.data import ImageData, load_cifar10, load_digits
from fused_ensemble.fused import FusedEnsemble
from fused_ensemble.training.amp import MemberGradScaler
from fused_ensemble.training.batches import SAMPLINGS
from fused_ensemble.training.checkpoint import (
    discard_partial_writes,
    load_checkpoint,
    rng_states,
    save_checkpoint,
    set_rng_states,
)
from fused_ensemble.training.loop import evaluate, train_epoch
from fused_ensemble.training.lr_scheduler import CosineAnnealingLR
from fused_ensemble.training.member_values import MemberValue
from fused_ensemble.training.optim import SGD, Adam, AdamW

__all__ = ["add_train_arguments", "run_train", "format_table", "seeded_member", "CHECKPOINT_FILE"]


DEFAULTS = {  # per dataset: model, epochs, batch size, learning rate
    "digits": dict(model="small-cnn", epochs=6, batch_size=64, lr=0.1),
    "cifar10": dict(model="resnet18-cifar", epochs=1, batch_size=128, lr=0.1),
}


AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}

CHECKPOINT_FILE = "checkpoint.pt"
"""The file in ``--checkpoint-dir`` that holds the latest epoch's checkpoint."""
CHECKPOINT_FORMAT = "fused_ensemble train checkpoint"
CHECKPOINT_VERSION = 1


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``train`` command's options to ``parser``."""
    parser.add_argument("--dataset", choices=sorted(DEFAULTS), default="digits")
    parser.add_argument("--data-dir", default=None, help="folder holding cifar-10-batches-py (cifar10 only)")
    parser.add_argument("--members", type=int, default=8, help="number of members N (default 8)")
    parser.add_argument("--model", default=None,
                        help="member architecture: small-cnn (digits default) or a fused_ensemble.cli.models name "
                             "(cifar10 default: resnet18-cifar)")
    parser.add_argument("--epochs", type=int, default=None, help="default: 6 (digits), 1 (cifar10)")
    parser.add_argument("--batch-size", type=int, default=None, help="per member; default 64 (digits), 128 (cifar10)")
    parser.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default="sgd",
                        help="fused_ensemble.optim.SGD (Nesterov momentum), Adam (L2 weight decay) or AdamW "
                             "(decoupled weight decay); default sgd")
    parser.add_argument("--lr", type=float, nargs="+", default=None,
                        help="learning rate: one value, or one per member (default 0.1 for SGD, 1e-3 for Adam and "
                             "AdamW)")
    parser.add_argument("--weight-decay", type=float, nargs="+", default=[5e-4],
                        help="one value, or one per member (default 5e-4)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    parser.add_argument("--clip-grad-norm", type=float, nargs="+", default=None,
                        help="clip each member's gradient norm: one value, or one per member (default: no clipping)")
    parser.add_argument("--amp", choices=AMP_DTYPES, default="none",
                        help="mixed precision: autocast the forward in bf16, or in fp16 with per-member loss "
                             "scaling (fused_ensemble.amp.MemberGradScaler); default none (float32)")
    parser.add_argument("--sampling", choices=SAMPLINGS, default="shuffle",
                        help="per-member data order: own shuffle (default) or bootstrap resample (bagging)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--max-train", type=int, default=None, help="use only the first examples (quick runs)")
    parser.add_argument("--max-test", type=int, default=None)
    parser.add_argument("--no-verify-md5", action="store_true",
                        help="cifar10: skip the md5 check against the official archive (files in the format but not "
                             "the official ones; they are still read without running any code from them)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the summary as JSON")
    parser.add_argument("--plot", default=None, metavar="PATH", help="write a reliability diagram PNG")
    parser.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                        help=f"write DIR/{CHECKPOINT_FILE} after every epoch (model, optimizer, scheduler, loss "
                             f"scaler, random number generators, epoch, summary so far); created if missing")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the checkpoint in --checkpoint-dir (a fresh start when there is none yet); "
                             "the options that decide what the run computes must be those of the checkpointed run")
    add_calibration_arguments(parser)


def _exit(message: str) -> SystemExit:
    """What the command raises for a bad argument, path or file: Python prints the message on stderr and exits with
    status 1."""
    return SystemExit(f"fused-ensemble train: error: {message}")


def _run_config(args) -> dict:
    """The options that decide what the run computes, defaults resolved, after checking every value: a checkpoint
    resumes only a run with the same ones."""
    defaults = DEFAULTS[args.dataset]
    config = {
        "dataset": args.dataset, "model": args.model or defaults["model"], "members": args.members,
        "epochs": args.epochs if args.epochs is not None else defaults["epochs"],
        "batch_size": args.batch_size if args.batch_size is not None else defaults["batch_size"],
        "optimizer": args.optimizer, "lr": args.lr or [defaults["lr"] if args.optimizer == "sgd" else 1e-3],
        "weight_decay": args.weight_decay, "momentum": args.momentum if args.optimizer == "sgd" else None,
        "clip_grad_norm": args.clip_grad_norm, "amp": args.amp, "sampling": args.sampling, "seed": args.seed,
        "max_train": args.max_train, "max_test": args.max_test,
    }
    for option, key in (("--members", "members"), ("--epochs", "epochs"), ("--batch-size", "batch_size")):
        if config[key] < 1:
            raise _exit(f"{option} must be at least 1, got {config[key]}")
    for option, key in (("--max-train", "max_train"), ("--max-test", "max_test")):
        if config[key] is not None and config[key] < 1:
            raise _exit(f"{option} must be at least 1 (leave it out to use every example), got {config[key]}")
    for option, key in (("--lr", "lr"), ("--weight-decay", "weight_decay"), ("--clip-grad-norm", "clip_grad_norm")):
        values = config[key]
        if values is not None and len(values) not in (1, config["members"]):
            raise _exit(f"{option} takes one value or one per member ({config['members']}), got {len(values)}")
        if values is not None and any(v < 0 for v in values):
            raise _exit(f"{option} values must not be negative, got {values}")
    if args.momentum < 0:
        raise _exit(f"--momentum must not be negative, got {args.momentum}")
    if config["model"] != "small-cnn" and config["model"] not in MODELS:
        raise _exit(f"unknown --model {config['model']!r}; expected small-cnn or one of {', '.join(MODELS)}")
    return config


def _check_output_file(path: str, option: str) -> None:
    if os.path.isdir(path):
        raise _exit(f"{option} {path} is a folder: give the path of the file to write")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise _exit(f"{option} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise _exit(f"{option} {path} cannot be written")


def _check_outputs(args) -> str | None:
    """Checks every path the run will write before it trains; creates the checkpoint folder. Returns the checkpoint
    file's path (None without ``--checkpoint-dir``)."""
    if args.resume and not args.checkpoint_dir:
        raise _exit("--resume needs --checkpoint-dir DIR (the folder holding the checkpoint to continue from)")
    if args.checkpoint_dir:  # first: --json and --plot may name files in it
        if os.path.exists(args.checkpoint_dir) and not os.path.isdir(args.checkpoint_dir):
            raise _exit(f"--checkpoint-dir {args.checkpoint_dir} is a file, not a folder")
        try:
            os.makedirs(args.checkpoint_dir, exist_ok=True)
        except OSError as error:
            raise _exit(f"--checkpoint-dir {args.checkpoint_dir} cannot be created ({error.strerror})") from error
        if not os.access(args.checkpoint_dir, os.W_OK):
            raise _exit(f"--checkpoint-dir {args.checkpoint_dir} cannot be written")
    if args.json:
        _check_output_file(args.json, "--json")
    if args.plot:
        _check_output_file(args.plot, "--plot")
        if importlib.util.find_spec("matplotlib") is None:
            raise _exit("--plot needs matplotlib (pip install matplotlib)")
    if not args.checkpoint_dir:
        return None
    path = os.path.join(args.checkpoint_dir, CHECKPOINT_FILE)
    discard_partial_writes(path)
    return path


def _resume_from(path: str, config: dict) -> dict | None:
    """The checkpoint to continue from (None, with a note, when there is none yet), after checking that it was written
    by a run with the same configuration."""
    if not os.path.exists(path):
        print(f"--resume: no checkpoint at {path} yet: starting from the first epoch", file=sys.stderr)
        return None
    try:
        checkpoint = load_checkpoint(path)
    except Exception as error:  # noqa: BLE001  (any unreadable file gets the same clear message)
        raise _exit(f"--resume: {path} is not a readable checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise _exit(f"--resume: {path} is not a checkpoint of this command")
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise _exit(f"--resume: {path} has checkpoint version {checkpoint.get('version')}, this command reads "
                    f"version {CHECKPOINT_VERSION}")
    saved = checkpoint["config"]
    differ = [f"{key}: checkpoint {saved.get(key)!r}, now {value!r}" for key, value in config.items()
              if saved.get(key) != value]
    if differ:
        raise _exit(f"--resume: {path} was written by a run with other options ({'; '.join(differ)}); give the same "
                    f"options, or another --checkpoint-dir")
    return checkpoint


def _load(args, config: dict) -> ImageData:
    """The dataset, cut to ``--max-train``/``--max-test``; a missing or malformed dataset exits with its reason."""
    max_train, max_test = config["max_train"], config["max_test"]
    if args.dataset == "digits":
        data = load_digits()
        data.train_x, data.train_y = data.train_x[:max_train], data.train_y[:max_train]
        data.test_x, data.test_y = data.test_x[:max_test], data.test_y[:max_test]
    elif args.data_dir is None:
        raise _exit("--dataset cifar10 needs --data-dir PATH (the folder holding cifar-10-batches-py)")
    else:
        try:
            data = load_cifar10(args.data_dir, verify_md5=not args.no_verify_md5, max_train=max_train,
                                max_test=max_test)
        except (OSError, ValueError, pickle.UnpicklingError) as error:
            raise _exit(str(error)) from error
    if data.train_x.shape[0] < config["batch_size"]:
        raise _exit(f"--batch-size {config['batch_size']} is larger than the {data.train_x.shape[0]} training "
                    f"examples: an epoch would have no full batch")
    if data.test_x.shape[0] == 0:
        raise _exit("the test set is empty: nothing to evaluate")
    return data


def _build_member(name: str, in_channels: int, num_classes: int) -> nn.Module:
    if name == "small-cnn":
        return small_cnn(in_channels, num_classes)
    return build_model(name, num_classes)


def seeded_member(name: str, data: ImageData, seed: int, index: int) -> nn.Module:
    """Member ``index`` of a run seeded ``seed``, initialized from a seed of its own (derived from both), so that it is
    the same member whichever process builds it, and whichever members are built with it."""
    torch.manual_seed(int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))
    return _build_member(name, data.train_x.shape[1], data.num_classes)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise _exit(f"--device {name!r} is not a device ({error})") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _exit(f"--device {name}: CUDA is not available here")
    return device


def _one_or_per_member(values: list[float]) -> MemberValue:
    """A command-line list of one value (for every member) or one per member, as the optimizers take it."""
    return values[0] if len(values) == 1 else values


def run_train(args: argparse.Namespace) -> dict:
    """Trains ``args.members`` members as one FusedEnsemble, prints per-member and ensemble metrics on the test
    set, and writes ``--json`` / ``--plot``. With ``--checkpoint-dir``, writes a checkpoint after every epoch;
    with ``--resume``, continues from it. Every argument and output path is checked first: a bad one raises
    ``SystemExit`` (its message the reason; status 1 from the command line) before anything trains. Returns the
    summary dict (what ``--json`` writes)."""
    config = _run_config(args)
    try:
        calibration = calibration_options(args)
    except ValueError as error:
        raise _exit(str(error)) from error
    if calibration is not None:  # the held-out examples change the training data
        config["calibration_fraction"] = calibration.fraction
    checkpoint_path = _check_outputs(args)
    if torch.distributed.is_available() and torch.distributed.is_torchelastic_launched():
        if calibration is not None:
            raise _exit("--calibrate is not supported under torchrun: train in one process to calibrate")
        from fused_ensemble.cli.train_sharded import run_sharded_train  # the members sharded over the processes

        data = _load(args, config)
        return run_sharded_train(args, config, data, lambda index: seeded_member(config["model"], data, args.seed,
                                                                                 index), format_table)
    device = _device(args.device)
    checkpoint = _resume_from(checkpoint_path, config) if args.resume else None
    data = _load(args, config)
    held_out = None
    if calibration is not None:
        try:
            data, held_out = hold_out(data, calibration, args.seed, config["batch_size"])
        except ValueError as error:
            raise _exit(str(error)) from error
    model, n, epochs, batch_size = config["model"], config["members"], config["epochs"], config["batch_size"]

    members = [seeded_member(model, data, args.seed, index) for index in range(n)]
    torch.manual_seed(args.seed)  # the stream after the members does not depend on which were built
    fused = FusedEnsemble(members, reduction="none", member_inputs=True).to(device)
    per_member = dict(lr=_one_or_per_member(config["lr"]), weight_decay=_one_or_per_member(args.weight_decay))
    if args.optimizer == "adamw":
        optimizer = AdamW(fused.parameters(), **per_member)
    elif args.optimizer == "adam":
        optimizer = Adam(fused.parameters(), **per_member)
    else:
        optimizer = SGD(fused.parameters(), momentum=args.momentum, nesterov=args.momentum > 0, **per_member)
    scheduler = CosineAnnealingLR(optimizer, T_max=epochs)
    clip = None if args.clip_grad_norm is None else _one_or_per_member(args.clip_grad_norm)
    autocast_dtype = AMP_DTYPES[args.amp]
    scaler = MemberGradScaler(n, device) if args.amp == "fp16" else None
    generator = torch.Generator().manual_seed(args.seed)  # the members' data order

    first_epoch, steps, epoch_seconds = 0, 0, []
    if checkpoint is not None:
        fused.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if scaler is not None:
            scaler.load_state_dict(checkpoint["scaler"])
        set_rng_states(checkpoint["rng"], device, {"data_order": generator})
        first_epoch = checkpoint["epoch"]
        steps, epoch_seconds = checkpoint["summary"]["train_steps"], list(checkpoint["summary"]["epoch_seconds"])

    from tqdm import tqdm

    steps_per_epoch = data.train_x.shape[0] // batch_size
    progress = tqdm(total=epochs * steps_per_epoch, initial=first_epoch * steps_per_epoch,
                    desc=f"train {n} x {model} on {data.name}", unit="step", disable=args.no_progress)
    for epoch in range(first_epoch, epochs):
        progress.set_description(f"epoch {epoch + 1}/{epochs}")
        start = time.perf_counter()
        steps += train_epoch(fused, optimizer, data.train_x, data.train_y, batch_size, args.sampling, generator,
                             progress, clip_grad_norm=clip, autocast_dtype=autocast_dtype, scaler=scaler)
        scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_seconds.append(time.perf_counter() - start)
        if checkpoint_path is not None:
            save_checkpoint(checkpoint_path, {
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": config, "epoch": epoch + 1,
                "model": fused.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": None if scaler is None else scaler.state_dict(),
                "rng": rng_states(device, {"data_order": generator}),
                "summary": {"train_steps": steps, "epoch_seconds": epoch_seconds}})
    progress.close()

    result = evaluate(fused, data.test_x, data.test_y)
    ensemble_probs = result.pop("_ensemble_probs")
    calibrated, calibrated_probs = ({}, None) if held_out is None else calibrate(
        fused, held_out, data.test_x, data.test_y, calibration)
    summary = run_summary(args, config, data, device, steps=steps, epoch_seconds=epoch_seconds,
                          resumed_from_epoch=None if checkpoint is None else first_epoch,
                          loss_scale=None if scaler is None else scaler.get_scale().tolist(),
                          metrics={**result, **calibrated})
    print(format_table(summary))
    if calibrated:
        print(format_calibration(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    if args.plot:
        calibrated_title = None if calibrated_probs is None else (
            f"after temperature scaling (T = {summary['temperature']:.3f}): "
            f"ensemble ECE {summary['ensemble_ece_calibrated']:.4f}")
        plot_reliability(ensemble_probs, data.test_y, args.plot,
                         title=f"{n} x {model} on {data.name}: ensemble ECE {summary['ensemble_ece']:.4f}",
                         calibrated_probs=calibrated_probs, calibrated_title=calibrated_title)
    return summary


def format_table(summary: dict) -> str:
    """The per-member and ensemble metrics as a Markdown table, with the training time."""
    rows = ["| | accuracy | NLL | Brier | ECE |", "|---|---|---|---|---|"]
    for i in range(summary["members"]):
        rows.append(f"| member {i} | " + " | ".join(f"{summary[f'member_{k}'][i]:.4f}"
                                                    for k in ("accuracy", "nll", "brier", "ece")) + " |")
    for label, prefix in (("mean member", "mean_member"), ("**ensemble**", "ensemble")):
        rows.append(f"| {label} | " + " | ".join(f"{summary[f'{prefix}_{k}']:.4f}"
                                                 for k in ("accuracy", "nll", "brier", "ece")) + " |")
    rows.append(f"\n{summary['members']} members, {summary['epochs']} epochs, {summary['train_steps']} steps in "
                f"{summary['train_seconds']:.1f} s on {summary['device']}: "
                f"{summary['train_member_images_per_s']:.0f} member-images/s")
    return "\n".join(rows)
