"""The summary of a ``train`` run, the same keys whether it ran in one process or sharded under ``torchrun``."""

from __future__ import annotations

import argparse
import platform

import torch

from fused_ensemble.cli.environment import environment_info
from fused_ensemble.data import ImageData


def run_summary(args: argparse.Namespace, config: dict, data: ImageData, device: torch.device, *, steps: int,
                epoch_seconds: list[float], resumed_from_epoch: int | None, loss_scale: list[float] | None,
                metrics: dict) -> dict:
    """What ``--json`` writes: the run's configuration, its training time and throughput, and ``metrics`` (the
    per-member and ensemble metrics of the test set)."""
    train_seconds = sum(epoch_seconds)
    members, batch_size = config["members"], config["batch_size"]
    return {
        "environment": environment_info(str(device)),
        "dataset": data.name, "model": config["model"], "members": members, "epochs": config["epochs"],
        "batch_size": batch_size, "optimizer": args.optimizer, "lr": config["lr"], "weight_decay": args.weight_decay,
        "momentum": config["momentum"], "sampling": args.sampling,
        "clip_grad_norm": args.clip_grad_norm, "amp": args.amp, "loss_scale": loss_scale,
        "seed": args.seed, "device": str(device), "train_examples": int(data.train_x.shape[0]),
        "test_examples": int(data.test_x.shape[0]), "train_steps": steps,
        "train_seconds": train_seconds, "epoch_seconds": epoch_seconds,
        "resumed_from_epoch": resumed_from_epoch,
        # every member processes its own batch: N * B member-images per step
        "train_member_images_per_s": steps * members * batch_size / train_seconds,
        **metrics,
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
    }
