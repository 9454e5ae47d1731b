"""The ``train`` command under torchrun (2 CPU processes, gloo): the members sharded over the processes report the
metrics of one process with the same options; a run whose process is killed resumes from its last checkpoint to the
members of a run never interrupted, bit for bit; an exception in one process stops the other with a PeerFailure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from fused_ensemble.cli import build_parser
from fused_ensemble.cli import train as train_command
from fused_ensemble.cli.models import small_cnn
from fused_ensemble.distributed import load, load_state
from fused_ensemble.training.optim import SGD

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")]

ROOT = Path(__file__).resolve().parents[2]
# 5 members over 2 processes (blocks 0-2 and 3-4), 3 epochs of 8 steps, per-member learning rates, bootstrap draws.
ARGV = ["train", "--dataset", "digits", "--members", "5", "--epochs", "3", "--batch-size", "32", "--max-train", "256",
        "--max-test", "120", "--lr", "0.1", "0.05", "0.08", "0.02", "0.1", "--sampling", "bootstrap", "--device", "cpu",
        "--no-progress"]
METRICS = ("member_accuracy", "member_nll", "member_brier", "member_ece", "ensemble_accuracy", "ensemble_nll",
           "ensemble_brier", "ensemble_ece", "ensemble_mutual_info", "ensemble_pairwise_disagreement")

# Runs the train command in a torchrun process; at optimizer step `stop_at` the process of rank `rank` either blocks
# (and writes its pid to `marker`, for the test to kill it) or raises.
INTERRUPTED_RUN = """
import os, sys, time
from pathlib import Path
from fused_ensemble.cli import main
from fused_ensemble.training import optim

marker, stop_at, rank, how = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
taken = 0
step = optim.SGD.step

def interrupted_step(self, *args, **kwargs):
    global taken
    taken += 1
    if taken == stop_at and os.environ["RANK"] == rank:
        if how == "raise":
            raise ValueError(f"boom at step {taken}")
        marker.write_text(str(os.getpid()))
        time.sleep(600)
    return step(self, *args, **kwargs)

optim.SGD.step = interrupted_step
sys.exit(main(sys.argv[5:]))
"""


def _environment() -> dict:
    python_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=python_path)


def _torchrun(*arguments: str, processes: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
            *arguments]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("uninterrupted")
    done = subprocess.run(_torchrun("-m", "fused_ensemble", *ARGV, "--checkpoint-dir", str(folder / "checkpoints"),
                                    "--json", str(folder / "summary.json")),
                          capture_output=True, text=True, env=_environment(), timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("**ensemble**") == 1  # rank 0 alone prints the summary
    return folder


def test_members_sharded_over_2_processes_report_the_metrics_of_one_process(uninterrupted, tmp_path):
    sharded = json.loads((uninterrupted / "summary.json").read_text())
    one = train_command.run_train(build_parser().parse_args(ARGV + ["--json", str(tmp_path / "one.json")]))
    assert sharded["processes"] == 2 and sharded["member_blocks"] == [[0, 2], [3, 4]]
    assert set(one) | {"processes", "member_blocks"} == set(sharded)
    assert sharded["train_steps"] == one["train_steps"] == 24
    for key in METRICS:
        assert sharded[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key


def _members_and_optimizer(folder: Path):
    checkpoint = json.loads((folder / "sharded-checkpoint.json").read_text())
    path = str(folder / checkpoint["folder"])
    fused = load(path, lambda index: small_cnn(1, 10))
    optimizer = SGD(fused.parameters(), lr=0.1, momentum=0.9)
    load_state(path, fused, optimizer)
    return checkpoint, fused, optimizer


def test_a_killed_run_resumes_to_the_members_of_a_run_never_interrupted(uninterrupted, tmp_path):
    script = tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED_RUN)
    marker, checkpoints = tmp_path / "stopped", tmp_path / "checkpoints"
    with open(tmp_path / "killed.log", "w") as log:
        run = subprocess.Popen(_torchrun(str(script), str(marker), "12", "1", "block", *ARGV, "--checkpoint-dir",
                                         str(checkpoints)), stdout=log, stderr=subprocess.STDOUT, env=_environment())
        try:
            deadline = time.monotonic() + 600  # a limit on waiting, not a timing assumption
            while not marker.exists() or not marker.read_text():
                if run.poll() is not None:
                    pytest.fail(f"the run ended before it was killed:\n{(tmp_path / 'killed.log').read_text()}")
                assert time.monotonic() < deadline, "the run never reached the step it stops at"
                time.sleep(0.05)
            os.kill(int(marker.read_text()), signal.SIGKILL)  # rank 1, in epoch 2 (step 12 of 24)
            assert run.wait(timeout=300) != 0
        finally:
            if run.poll() is None:
                run.kill()
    assert json.loads((checkpoints / "sharded-checkpoint.json").read_text())["epoch"] == 1

    done = subprocess.run(_torchrun("-m", "fused_ensemble", *ARGV, "--checkpoint-dir", str(checkpoints), "--resume",
                                    "--json", str(tmp_path / "resumed.json")),
                          capture_output=True, text=True, env=_environment(), timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    (expected, whole, whole_optimizer), (got, resumed, resumed_optimizer) = (
        _members_and_optimizer(folder) for folder in (uninterrupted / "checkpoints", checkpoints))
    assert got["epoch"] == expected["epoch"] == 3
    for name, tensor in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    for mine, theirs in zip(resumed.parameters(), whole.parameters()):
        for key, value in whole_optimizer.state[theirs].items():
            assert torch.equal(resumed_optimizer.state[mine][key], value), key
    whole_summary, resumed_summary = (json.loads(path.read_text())
                                      for path in (uninterrupted / "summary.json", tmp_path / "resumed.json"))
    assert resumed_summary["resumed_from_epoch"] == 1 and resumed_summary["train_steps"] == 24
    for key in METRICS:
        assert resumed_summary[key] == whole_summary[key], key

    # Resuming needs as many processes as wrote the checkpoint.
    again = subprocess.run(_torchrun("-m", "fused_ensemble", *ARGV, "--checkpoint-dir", str(checkpoints), "--resume",
                                     processes=1), capture_output=True, text=True, env=_environment(), timeout=600)
    assert again.returncode != 0 and "was written by 2 processes, this run has 1" in again.stdout + again.stderr


def test_an_exception_in_one_process_stops_the_other_with_a_peer_failure(tmp_path):
    script = tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED_RUN)
    start = time.monotonic()
    done = subprocess.run(_torchrun(str(script), str(tmp_path / "unused"), "5", "1", "raise", *ARGV),
                          capture_output=True, text=True, env=_environment(), timeout=600, check=False)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "ValueError: boom at step 5" in output
    assert "PeerFailure: step boundary 4: rank 1 failed (rank 1: ValueError: boom at step 5)" in output, output
    assert time.monotonic() - start < 300


def test_calibrate_under_torchrun_stops_before_training(monkeypatch, no_training):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")  # what torch.distributed.is_torchelastic_launched() reads
    with pytest.raises(SystemExit, match="--calibrate is not supported under torchrun"):
        train_command.run_train(build_parser().parse_args(ARGV + ["--calibrate"]))
