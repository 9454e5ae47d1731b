"""What a user imports and runs: every exported name, the training modules under their old import names, and the
command line's help."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import fused_ensemble

REFERENCE_INDEX = Path(__file__).resolve().parents[1] / "docs" / "reference" / "index.md"


def test_every_exported_name_exists():
    for name in fused_ensemble.__all__:
        assert getattr(fused_ensemble, name) is not None, name


def test_the_reference_index_lists_every_exported_name():
    listed = set(re.findall(r"^\| `(\w+)` \|", REFERENCE_INDEX.read_text(), flags=re.MULTILINE))
    assert sorted(set(fused_ensemble.__all__) - listed) == []


def test_training_modules_keep_their_import_names():
    for name in ("optim", "lr_scheduler", "clip_grad", "amp"):
        module = importlib.import_module(f"fused_ensemble.{name}")
        assert module is getattr(fused_ensemble, name)
        assert module.__name__ == f"fused_ensemble.training.{name}"
    from fused_ensemble.optim import SGD, AdamW  # noqa: F401


def test_the_distributed_module_imports_without_a_process_group():
    import fused_ensemble.distributed as distributed

    for name in distributed.__all__:
        assert getattr(distributed, name) is not None, name
    assert {"ShardedEnsemble", "save", "load", "FailTogether", "CollectiveLog"} <= set(distributed.__all__)


def test_help_lists_the_commands():
    done = subprocess.run([sys.executable, "-m", "fused_ensemble", "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert all(command in done.stdout for command in ("bench", "train", "export", "predict"))
    for command, option in (("bench", "--members"), ("train", "--members"), ("export", "--members"),
                            ("predict", "--model")):
        done = subprocess.run([sys.executable, "-m", "fused_ensemble", command, "--help"], capture_output=True,
                              text=True)
        assert done.returncode == 0 and option in done.stdout, done.stderr
