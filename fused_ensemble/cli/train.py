"""``python -m fused_ensemble train``: N members trained as one FusedEnsemble on digits or CIFAR-10, evaluated per
member and as an ensemble, with a JSON summary and a reliability diagram."""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from torch import nn

from fused_ensemble.cli.models import build_model, small_cnn
from fused_ensemble.cli.plots import plot_reliability
from fused_ensemble.data import ImageData, load_cifar10, load_digits
from fused_ensemble.fused import FusedEnsemble
from fused_ensemble.training.amp import MemberGradScaler
from fused_ensemble.training.batches import SAMPLINGS
from fused_ensemble.training.loop import evaluate, train_epoch
from fused_ensemble.training.lr_scheduler import CosineAnnealingLR
from fused_ensemble.training.member_values import MemberValue
from fused_ensemble.training.optim import SGD, Adam, AdamW

__all__ = ["add_train_arguments", "run_train", "format_table"]


DEFAULTS = {  # per dataset: model, epochs, batch size, learning rate
    "digits": dict(model="small-cnn", epochs=6, batch_size=64, lr=0.1),
    "cifar10": dict(model="resnet18-cifar", epochs=1, batch_size=128, lr=0.1),
}


AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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
                        help="cifar10: skip torchvision's md5 check (files in the format but not the official ones)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the summary as JSON")
    parser.add_argument("--plot", default=None, metavar="PATH", help="write a reliability diagram PNG")


def _load(args) -> ImageData:
    if args.dataset == "digits":
        data = load_digits()
        if args.max_train or args.max_test:
            data.train_x, data.train_y = data.train_x[:args.max_train], data.train_y[:args.max_train]
            data.test_x, data.test_y = data.test_x[:args.max_test], data.test_y[:args.max_test]
        return data
    if args.data_dir is None:
        raise SystemExit("--dataset cifar10 needs --data-dir PATH (the folder holding cifar-10-batches-py)")
    return load_cifar10(args.data_dir, verify_md5=not args.no_verify_md5, max_train=args.max_train,
                        max_test=args.max_test)


def _build_member(name: str, in_channels: int, num_classes: int) -> nn.Module:
    if name == "small-cnn":
        return small_cnn(in_channels, num_classes)
    return build_model(name, num_classes)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _one_or_per_member(values: list[float]) -> MemberValue:
    """A command-line list of one value (for every member) or one per member, as the optimizers take it."""
    return values[0] if len(values) == 1 else values


def run_train(args: argparse.Namespace) -> dict:
    """Trains ``args.members`` members as one FusedEnsemble, prints per-member and ensemble metrics on the test
    set, and writes ``--json`` / ``--plot``. Returns the summary dict (what ``--json`` writes)."""
    defaults = DEFAULTS[args.dataset]
    model = args.model or defaults["model"]
    epochs = args.epochs if args.epochs is not None else defaults["epochs"]
    batch_size = args.batch_size or defaults["batch_size"]
    lr = args.lr or [defaults["lr"] if args.optimizer == "sgd" else 1e-3]
    n = args.members
    if n < 1 or epochs < 1 or batch_size < 1:
        raise SystemExit(f"--members, --epochs and --batch-size must be >= 1, got {n}, {epochs}, {batch_size}")
    device = _device(args.device)

    data = _load(args)
    torch.manual_seed(args.seed)
    members = [_build_member(model, data.train_x.shape[1], data.num_classes) for _ in range(n)]
    fused = FusedEnsemble(members, reduction="none", member_inputs=True).to(device)
    per_member = dict(lr=_one_or_per_member(lr), weight_decay=_one_or_per_member(args.weight_decay))
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
    generator = torch.Generator().manual_seed(args.seed)

    from tqdm import tqdm

    steps_per_epoch = data.train_x.shape[0] // batch_size
    progress = tqdm(total=epochs * steps_per_epoch, desc=f"train {n} x {model} on {data.name}",
                    unit="step", disable=args.no_progress)
    steps = 0
    start = time.perf_counter()
    for epoch in range(epochs):
        progress.set_description(f"epoch {epoch + 1}/{epochs}")
        steps += train_epoch(fused, optimizer, data.train_x, data.train_y, batch_size, args.sampling, generator,
                             progress, clip_grad_norm=clip, autocast_dtype=autocast_dtype, scaler=scaler)
        scheduler.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_seconds = time.perf_counter() - start
    progress.close()

    result = evaluate(fused, data.test_x, data.test_y)
    ensemble_probs = result.pop("_ensemble_probs")
    summary = {
        "dataset": data.name, "model": model, "members": n, "epochs": epochs, "batch_size": batch_size,
        "optimizer": args.optimizer, "lr": lr, "weight_decay": args.weight_decay,
        "momentum": args.momentum if args.optimizer == "sgd" else None, "sampling": args.sampling,
        "clip_grad_norm": args.clip_grad_norm, "amp": args.amp,
        "loss_scale": None if scaler is None else scaler.get_scale().tolist(),
        "seed": args.seed, "device": str(device), "train_examples": int(data.train_x.shape[0]),
        "test_examples": int(data.test_x.shape[0]), "train_steps": steps,
        "train_seconds": train_seconds,
        # every member processes its own batch: N * B member-images per step
        "train_member_images_per_s": steps * n * batch_size / train_seconds,
        **result,
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
    }
    print(format_table(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    if args.plot:
        plot_reliability(ensemble_probs, data.test_y, args.plot,
                         title=f"{n} x {model} on {data.name}: ensemble ECE {summary['ensemble_ece']:.4f}")
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
