"""What a result file records about where and how it was measured: machine, card, versions, commit, command, date."""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import subprocess
import sys

import torch

from fused_ensemble import config, cpu_memory


def machine_name(device: str) -> str:
    """A short name of the machine for result folders: the GPU model (``h100``, ``a100``, ...) on CUDA, else
    ``cpu-<cores>core``."""
    if str(device).startswith("cuda"):
        card = torch.cuda.get_device_name(torch.device(device))
        model = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Za-z]?)\b", card.replace("NVIDIA", ""))
        return model.group(1).lower() if model else re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")
    return f"cpu-{os.cpu_count()}core"


def invoked_command(argv: list[str] | None = None) -> str:
    """The command line that runs this process, as a user would type it (``python -m fused_ensemble bench ...``)."""
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0].endswith("__main__.py"):
        argv = ["python", "-m", os.path.basename(os.path.dirname(argv[0])), *argv[1:]]
    elif argv and argv[0].endswith(".py"):
        argv = ["python", os.path.relpath(argv[0]), *argv[1:]]
    elif argv:
        argv[0] = os.path.basename(argv[0])
    return shlex.join(argv)


def git_commit() -> str | None:
    """The checked-out commit (``GIT_COMMIT`` where git cannot tell), or None."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False,
                              cwd=os.path.dirname(os.path.abspath(__file__)))
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip()
    except OSError:
        pass
    return config.settings.git_commit


def environment_info(device: str) -> dict:
    """The ``environment`` object of a result file measured on ``device``."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if str(device).startswith("cuda"):
        card = torch.cuda.get_device_name(torch.device(device))
    else:
        card = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"machine": machine_name(device), "card": card, "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version(), "commit": git_commit(), "command": invoked_command(),
            "date": datetime.date.today().isoformat(), "cpu_threads": torch.get_num_threads(),
            "cpu_allocator": cpu_memory.outcome()}
