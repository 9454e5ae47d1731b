"""The ``train`` command loses nothing: every argument and path is checked before training, checkpoints hold plain
contents only, and a run killed mid-training and resumed ends bit for bit as a run never interrupted."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fused_ensemble.cli import main
from fused_ensemble.cli import train as train_command
from fused_ensemble.training.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
QUICK = ["train", "--dataset", "digits", "--members", "2", "--epochs", "2", "--batch-size", "32", "--max-train", "128",
         "--max-test", "64", "--device", "cpu", "--no-progress"]


def _exits(argv) -> str:
    """The message of the SystemExit the command raises for ``argv``."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code not in (0, None)
    return str(exited.value.code)


@pytest.mark.parametrize("options, message", [
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--members", "0"], "--members must be at least 1, got 0"),
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--max-train", "-5"], r"--max-train must be at least 1 \(leave it out to use every example\), got -5"),
    (["--max-test", "-1"], "--max-test must be at least 1"),
    (["--lr", "0.1", "0.2", "0.3"], r"--lr takes one value or one per member \(2\), got 3"),
    (["--model", "no-such-model"], "unknown --model 'no-such-model'"),
    (["--weight-decay", "-1"], r"--weight-decay values must not be negative, got \[-1.0\]"),
    (["--momentum", "-0.5"], "--momentum must not be negative"),
    (["--json", "{tmp}/missing/summary.json"], r"--json .*summary.json: the folder .*missing does not exist"),
    (["--plot", "{tmp}"], "--plot .* is a folder"),
    (["--checkpoint-dir", "{tmp}/a-file"], "--checkpoint-dir .*a-file is a file, not a folder"),
    (["--resume"], "--resume needs --checkpoint-dir"),
    (["--batch-size", "500"], "--batch-size 500 is larger than the 128 training examples"),
    (["--device", "no-such-device"], "--device 'no-such-device' is not a device"),
])
def test_bad_arguments_and_paths_exit_before_training(tmp_path, no_training, options, message):
    (tmp_path / "a-file").write_text("")
    options = [option.replace("{tmp}", str(tmp_path)) for option in options]
    assert re.search(message, _exits(QUICK + options))


def test_a_bad_argument_exits_non_zero_from_the_command_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fused_ensemble", "train", "--batch-size", "0", "--json",
                           str(tmp_path / "summary.json")], capture_output=True, text=True, cwd=tmp_path,
                          env=_environment(), timeout=600)
    assert done.returncode != 0
    assert "fused-ensemble train: error: --batch-size must be at least 1, got 0" in done.stderr
    assert not (tmp_path / "summary.json").exists()


def _cifar_argv(root):
    return ["train", "--dataset", "cifar10", "--data-dir", str(root), "--no-verify-md5", "--model", "small-cnn",
            "--members", "2", "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--no-progress"]


def test_a_cifar_folder_with_labels_and_images_of_different_lengths_exits_before_training(tmp_path, no_training):
    from test_data import write_tiny_cifar10

    write_tiny_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "wb") as f:
        pickle.dump({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2]}, f)
    assert re.search(r"data_batch_2: 3 labels for 4 images", _exits(_cifar_argv(tmp_path)))


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_cifar_batch_that_would_run_code_exits_before_training(tmp_path, no_training):
    from test_data import write_tiny_cifar10

    write_tiny_cifar10(tmp_path)
    marker = tmp_path / "ran"
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((6, 3072), np.uint8), "labels": [RunsCode(str(marker))] * 6}, f)
    assert re.search(r"test_batch: refused to load \w+\.mkdir", _exits(_cifar_argv(tmp_path)))
    assert not marker.exists()


def _plain_contents(value, where="checkpoint"):
    """Every leaf of a loaded checkpoint: a tensor, number, string or None, in lists and dicts only."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, (str, int)), f"{where} has the key {key!r}"
            _plain_contents(item, f"{where}[{key!r}]")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _plain_contents(item, f"{where}[{index}]")
    else:
        assert value is None or isinstance(value, (bool, int, float, str, torch.Tensor)), f"{where}: {type(value)}"


def test_checkpoint_format_and_resuming_a_finished_run(tmp_path, capsys):
    folder = tmp_path / "checkpoints"
    argv = QUICK + ["--optimizer", "adam", "--amp", "fp16", "--lr", "1e-3", "2e-3", "--checkpoint-dir", str(folder),
                    "--json", str(folder / "summary.json")]
    assert main(argv) == 0  # --json may name a file in the checkpoint folder, which the command creates first
    assert sorted(os.listdir(folder)) == ["checkpoint.pt", "summary.json"]  # no temporary file left behind
    saved = torch.load(folder / "checkpoint.pt", weights_only=True)
    _plain_contents(saved)
    assert saved["format"] == "fused_ensemble train checkpoint" and saved["version"] == 1 and saved["epoch"] == 2
    assert set(saved) == {"format", "version", "config", "epoch", "model", "optimizer", "scheduler", "scaler", "rng",
                          "summary"}
    assert saved["config"]["optimizer"] == "adam" and saved["config"]["lr"] == [1e-3, 2e-3]
    assert saved["optimizer"]["param_groups"][0]["betas"] == [0.9, 0.999]
    assert saved["scheduler"]["last_epoch"] == 2 and len(saved["scaler"]["scale"]) == 2
    assert set(saved["rng"]) == {"torch", "generators"} and set(saved["rng"]["generators"]) == {"data_order"}
    assert saved["summary"]["train_steps"] == 8 and len(saved["summary"]["epoch_seconds"]) == 2
    assert all(isinstance(t, torch.Tensor) for t in saved["model"].values())
    first = json.loads((folder / "summary.json").read_text())

    # Resuming a finished run trains nothing and evaluates the same members.
    again = json.loads(json.dumps(train_command.run_train(_parse(argv + ["--resume"]))))
    assert again["resumed_from_epoch"] == 2 and again["train_steps"] == 8
    for key in ("member_accuracy", "member_nll", "ensemble_nll", "ensemble_ece", "loss_scale", "epoch_seconds"):
        assert again[key] == first[key], key
    # Other options than the checkpoint's: refused, naming them.
    message = _exits(argv[:-4] + ["--lr", "1e-2", "--checkpoint-dir", str(folder), "--resume"])
    assert re.search(r"other options \(lr: checkpoint \[0.001, 0.002\], now \[0.01\]\)", message)
    # A fresh start when there is nothing to resume yet.
    capsys.readouterr()
    summary = train_command.run_train(_parse(QUICK + ["--checkpoint-dir", str(tmp_path / "empty"), "--resume"]))
    assert summary["resumed_from_epoch"] is None and summary["train_steps"] == 8
    assert "no checkpoint at" in capsys.readouterr().err


def _parse(argv):
    from fused_ensemble.cli import build_parser

    return build_parser().parse_args(argv)


def _environment():
    python_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=python_path)


# Runs the train command, but blocks in the middle of the second epoch (at the optimizer step `stop_at`, after the
# first epoch's checkpoint) and says so in `marker`: the test kills it there with SIGKILL.
KILLED_RUN = """
import sys, time
from pathlib import Path
from fused_ensemble.cli import main
from fused_ensemble.training import optim

marker, stop_at = Path(sys.argv[1]), int(sys.argv[2])
taken = 0
step = optim.SGD.step

def blocking_step(self, *args, **kwargs):
    global taken
    taken += 1
    if taken == stop_at:
        marker.write_text(str(taken))
        time.sleep(600)
    return step(self, *args, **kwargs)

optim.SGD.step = blocking_step
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.slow
def test_a_run_killed_mid_training_and_resumed_ends_bit_for_bit_as_one_never_interrupted(tmp_path):
    # 2 members, 3 epochs of 10 steps (bootstrap resampling draws from the data-order generator).
    argv = ["train", "--dataset", "digits", "--members", "2", "--epochs", "3", "--batch-size", "32", "--max-train",
            "320", "--max-test", "100", "--lr", "0.1", "0.05", "--sampling", "bootstrap", "--device", "cpu",
            "--no-progress"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    command = [sys.executable, "-m", "fused_ensemble"]
    subprocess.run([*command, *argv, "--checkpoint-dir", str(whole), "--json", str(tmp_path / "whole.json")],
                   check=True, capture_output=True, env=_environment(), timeout=600)

    marker = tmp_path / "stopped"
    with open(tmp_path / "killed.log", "w") as log:
        killed = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(marker), "15", *argv, "--checkpoint-dir",
                                   str(resumed)], stdout=log, stderr=subprocess.STDOUT, env=_environment())
        try:
            deadline = time.monotonic() + 600  # a limit on waiting, not a timing assumption
            while not marker.exists():
                if killed.poll() is not None:
                    pytest.fail(f"the run ended before it was killed:\n{(tmp_path / 'killed.log').read_text()}")
                assert time.monotonic() < deadline, "the run never reached the step it stops at"
                time.sleep(0.05)
        finally:
            killed.send_signal(signal.SIGKILL)
            killed.wait()
    assert killed.returncode == -signal.SIGKILL
    assert load_checkpoint(str(resumed / "checkpoint.pt"))["epoch"] == 1  # killed in epoch 2, at step 15 of 30

    subprocess.run([*command, *argv, "--checkpoint-dir", str(resumed), "--resume", "--json",
                    str(tmp_path / "resumed.json")], check=True, capture_output=True, env=_environment(), timeout=600)
    expected, got = (load_checkpoint(str(folder / "checkpoint.pt")) for folder in (whole, resumed))
    assert got["epoch"] == expected["epoch"] == 3
    assert list(got["model"]) == list(expected["model"])
    for name, tensor in expected["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    for index, state in expected["optimizer"]["state"].items():
        for key, tensor in state.items():
            assert torch.equal(got["optimizer"]["state"][index][key], tensor), (index, key)
    whole_summary, resumed_summary = (json.loads((tmp_path / f"{name}.json").read_text())
                                      for name in ("whole", "resumed"))
    assert resumed_summary["resumed_from_epoch"] == 1 and resumed_summary["train_steps"] == 30
    for key in ("member_accuracy", "member_nll", "member_brier", "member_ece", "ensemble_nll", "train_steps"):
        assert resumed_summary[key] == whole_summary[key], key
