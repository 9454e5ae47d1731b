"""The ``train`` command under torchrun: the members sharded over the processes, as ``ShardedEnsemble`` blocks.

``torchrun --nproc-per-node P -m fused_ensemble train ...`` trains the same members as one process does with the same
options: member i is initialized from its own seed and sees the batches it sees in one process, whichever process
holds it. Each process trains its block; the evaluation combines the blocks' statistics; rank 0 prints the summary
and writes ``--json`` and ``--plot``. A rank that fails stops the others at the next step (``FailTogether``).

With ``--checkpoint-dir DIR`` every epoch is written through ``torch.distributed.checkpoint`` to
``DIR/sharded/epoch-<k>`` (members, optimizer state, loss scales, random number generators), and rank 0 then points
``DIR/sharded-checkpoint.json`` at it (written atomically: a run killed while writing keeps the previous epoch);
``--resume`` continues from the epoch it points at, with the same number of processes, and ends with the members of
a run never interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from fused_ensemble.cli.plots import plot_reliability
from fused_ensemble.cli.run_summary import run_summary
from fused_ensemble.data import ImageData
from fused_ensemble.distributed import (
    FailTogether,
    ShardedEnsemble,
    evaluate,
    load_extra,
    load_state,
    save,
    train_epoch,
)
from fused_ensemble.training.amp import MemberGradScaler
from fused_ensemble.training.lr_scheduler import CosineAnnealingLR
from fused_ensemble.training.optim import SGD, Adam, AdamW

__all__ = ["run_sharded_train", "POINTER_FILE"]

POINTER_FILE = "sharded-checkpoint.json"
"""The file in ``--checkpoint-dir`` naming the latest finished epoch's checkpoint folder of a torchrun run."""
POINTER_FORMAT = "fused_ensemble train sharded checkpoint"
POINTER_VERSION = 1
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _exit(message: str) -> SystemExit:
    return SystemExit(f"fused-ensemble train: error: {message}")


def _device(name: str) -> torch.device:
    """Each process's device: the GPU of its local rank (``auto`` with CUDA, or ``cuda``), else the CPU."""
    if name not in ("auto", "cpu", "cuda"):
        raise _exit(f"--device {name}: under torchrun give auto, cpu or cuda (each process takes the GPU of its local "
                    f"rank)")
    if name == "cpu" or not torch.cuda.is_available():
        if name == "cuda":
            raise _exit("--device cuda: CUDA is not available here")
        return torch.device("cpu")
    local_rank = dist.get_node_local_rank() if hasattr(dist, "get_node_local_rank") else dist.get_rank()
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def _write_json_atomically(path: str, value: dict) -> None:
    descriptor, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                             dir=os.path.dirname(os.path.abspath(path)))
    with os.fdopen(descriptor, "w") as f:
        json.dump(value, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def _resume_from(checkpoint_dir: str, config: dict) -> dict | None:
    path = os.path.join(checkpoint_dir, POINTER_FILE)
    if not os.path.exists(path):
        if dist.get_rank() == 0:
            print(f"--resume: no checkpoint at {path} yet: starting from the first epoch", file=sys.stderr)
        return None
    with open(path) as f:
        pointer = json.load(f)
    if not isinstance(pointer, dict) or pointer.get("format") != POINTER_FORMAT:
        raise _exit(f"--resume: {path} is not a checkpoint of this command")
    if pointer.get("version") != POINTER_VERSION:
        raise _exit(f"--resume: {path} has version {pointer.get('version')}, this command reads {POINTER_VERSION}")
    differ = [f"{key}: checkpoint {pointer['config'].get(key)!r}, now {value!r}" for key, value in config.items()
              if pointer["config"].get(key) != value]
    if differ:
        raise _exit(f"--resume: {path} was written by a run with other options ({'; '.join(differ)}); give the same "
                    f"options, or another --checkpoint-dir")
    if pointer["processes"] != dist.get_world_size():
        raise _exit(f"--resume: {path} was written by {pointer['processes']} processes, this run has "
                    f"{dist.get_world_size()}: resume with as many (fused_ensemble.distributed.load reads the members "
                    f"alone into any number of processes)")
    return pointer


def _extra_state(sharded, device, generator, scaler) -> dict[str, torch.Tensor]:
    extra = {"data_order": generator.get_state(), f"torch/rank{dist.get_rank()}": torch.get_rng_state()}
    if device.type == "cuda":
        extra[f"cuda/rank{dist.get_rank()}"] = torch.cuda.get_rng_state(device)
    if scaler is not None:
        state = scaler.state_dict()
        for position, index in enumerate(sharded.member_indices):
            extra[f"scale/{index}"] = torch.tensor([state["scale"][position], state["_growth_tracker"][position]],
                                                   dtype=torch.float64)
    return extra


def _restore(folder: str, sharded, optimizer, device, generator, scaler) -> None:
    load_state(folder, sharded, optimizer)
    names = ["data_order", f"torch/rank{dist.get_rank()}"]
    if device.type == "cuda":
        names.append(f"cuda/rank{dist.get_rank()}")
    if scaler is not None:
        names += [f"scale/{index}" for index in sharded.member_indices]
    extra = load_extra(folder, names)
    generator.set_state(extra["data_order"])
    torch.set_rng_state(extra[f"torch/rank{dist.get_rank()}"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(extra[f"cuda/rank{dist.get_rank()}"], device)
    if scaler is not None:
        state = scaler.state_dict()
        scales = [extra[f"scale/{index}"] for index in sharded.member_indices]
        state["scale"] = [float(scale[0]) for scale in scales]
        state["_growth_tracker"] = [int(scale[1]) for scale in scales]
        scaler.load_state_dict(state)


def run_sharded_train(args: argparse.Namespace, config: dict, data: ImageData,
                      build_member: Callable[[int], nn.Module], format_table: Callable[[dict], str]) -> dict:
    """``run_train`` of a torchrun process: ``config`` (checked), ``data`` (loaded) and ``build_member(index)`` (member
    ``index``, seeded by its index) come from the command; returns the summary (on every rank)."""
    device = _device(args.device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    try:
        return _train(args, config, data, build_member, format_table, device)
    finally:
        dist.destroy_process_group()


def _train(args, config, data, build_member, format_table, device) -> dict:
    rank, processes = dist.get_rank(), dist.get_world_size()
    n, epochs, batch_size, model = config["members"], config["epochs"], config["batch_size"], config["model"]
    if n < processes:
        raise _exit(f"--members {n} cannot be split over {processes} processes: give at least one member per process")
    pointer = _resume_from(args.checkpoint_dir, config) if args.resume else None
    guard = FailTogether(timeout=2 * COLLECTIVE_TIMEOUT)
    sharded = ShardedEnsemble(build_member, n, reduction="none", member_inputs=True).to(device)
    torch.manual_seed(args.seed)  # the same stream on every rank, whichever members it built
    one_or_all = {key: (values[0] if len(values) == 1 else values) for key, values in
                  (("lr", config["lr"]), ("weight_decay", args.weight_decay))}
    if args.optimizer == "adamw":
        optimizer = sharded.optimizer(AdamW, **one_or_all)
    elif args.optimizer == "adam":
        optimizer = sharded.optimizer(Adam, **one_or_all)
    else:
        optimizer = sharded.optimizer(SGD, momentum=args.momentum, nesterov=args.momentum > 0, **one_or_all)
    scheduler = CosineAnnealingLR(optimizer, T_max=epochs)
    clip = None
    if args.clip_grad_norm is not None:
        clip = sharded.local_values(args.clip_grad_norm[0] if len(args.clip_grad_norm) == 1 else args.clip_grad_norm)
    scaler = MemberGradScaler(len(sharded.member_indices), device) if args.amp == "fp16" else None
    generator = torch.Generator().manual_seed(args.seed)  # every member's data order, drawn on every rank

    first_epoch, steps, epoch_seconds = 0, 0, []
    if pointer is not None:
        _restore(os.path.join(args.checkpoint_dir, pointer["folder"]), sharded, optimizer, device, generator, scaler)
        first_epoch = pointer["epoch"]
        for _ in range(first_epoch):  # the closed-form schedule: the learning rates of the epoch resumed
            scheduler.step()
        steps, epoch_seconds = pointer["summary"]["train_steps"], list(pointer["summary"]["epoch_seconds"])

    from tqdm import tqdm

    steps_per_epoch = data.train_x.shape[0] // batch_size
    progress = tqdm(total=epochs * steps_per_epoch, initial=first_epoch * steps_per_epoch,
                    desc=f"train {n} x {model} on {data.name} over {processes} processes", unit="step",
                    disable=args.no_progress or rank != 0)
    for epoch in range(first_epoch, epochs):
        start = time.perf_counter()
        steps += train_epoch(sharded, optimizer, data.train_x, data.train_y, batch_size, args.sampling, generator,
                             progress, clip_grad_norm=clip, autocast_dtype=AMP_DTYPES[args.amp], scaler=scaler,
                             fail_together=guard)
        scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_seconds.append(time.perf_counter() - start)
        if args.checkpoint_dir:
            folder = os.path.join("sharded", f"epoch-{epoch + 1}")
            with guard:
                save(sharded, os.path.join(args.checkpoint_dir, folder), optimizer=optimizer,
                     extra=_extra_state(sharded, device, generator, scaler))
            if rank == 0:
                _write_json_atomically(os.path.join(args.checkpoint_dir, POINTER_FILE), {
                    "format": POINTER_FORMAT, "version": POINTER_VERSION, "config": config, "processes": processes,
                    "epoch": epoch + 1, "folder": folder,
                    "summary": {"train_steps": steps, "epoch_seconds": epoch_seconds}})
                for earlier in range(1, epoch + 1):
                    shutil.rmtree(os.path.join(args.checkpoint_dir, "sharded", f"epoch-{earlier}"), ignore_errors=True)
    progress.close()

    with guard:
        result = evaluate(sharded, data.test_x, data.test_y)
    ensemble_probs = result.pop("_ensemble_probs")
    summary = run_summary(args, config, data, device, steps=steps, epoch_seconds=epoch_seconds,
                          resumed_from_epoch=None if pointer is None else first_epoch,
                          loss_scale=None if scaler is None else _all_scales(sharded, scaler), metrics=result)
    summary["processes"] = processes
    summary["member_blocks"] = [[block.start, block.stop - 1] for block in sharded.blocks]
    if rank == 0:
        print(format_table(summary))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=2)
        if args.plot:
            plot_reliability(ensemble_probs, data.test_y, args.plot,
                             title=f"{n} x {model} on {data.name}: ensemble ECE {summary['ensemble_ece']:.4f}")
    return summary


def _all_scales(sharded: ShardedEnsemble, scaler: MemberGradScaler) -> list[float]:
    local = torch.tensor(scaler.get_scale().tolist(), dtype=torch.float64)
    return sharded.gather(local.to(next(sharded.local.parameters()).device)).tolist()
