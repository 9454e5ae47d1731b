"""Checkpoints of a training run: written atomically, read back without running pickled code.

``save_checkpoint(path, state)`` writes ``state`` with ``torch.save`` to a temporary file in ``path``'s folder, flushes
it to disk and renames it over ``path`` (``os.replace``): a run killed at any moment leaves the previous checkpoint or
the new one, never a torn file. ``state`` holds tensors, numbers, strings, None, lists and dicts only (tuples are
written as lists), which is all ``load_checkpoint`` accepts: it reads with ``torch.load(weights_only=True)``, which
builds tensors and plain containers and nothing else, and has no fallback.

``rng_states`` and ``set_rng_states`` save and restore, as tensors, the random number generators a training run draws
from: torch's CPU generator, the CUDA generator of the device it trains on, and its own ``torch.Generator`` objects
(a data order), so that a resumed run draws the numbers the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "discard_partial_writes", "rng_states", "set_rng_states"]


def _plain(value, where: str):
    """``value`` with tuples as lists, after checking that it holds tensors, numbers, strings, None, lists and dicts
    (with string or int keys) only; a ``TypeError`` names where anything else sits."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, dict):
        plain = {}
        for key, item in value.items():
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise TypeError(f"a checkpoint's dict keys must be strings or ints, {where} has {key!r}")
            plain[key] = _plain(item, f"{where}[{key!r}]")
        return plain
    raise TypeError(f"a checkpoint holds tensors, numbers, strings, None, lists and dicts only; {where} is a "
                    f"{type(value).__name__}")


def _temporary_prefix(path: str) -> str:
    return f".{os.path.basename(path)}."


def save_checkpoint(path: str, state: dict) -> None:
    """Writes ``state`` to ``path`` atomically: ``torch.save`` to a temporary file in the same folder, flushed to disk,
    then ``os.replace`` over ``path``. Raises a ``TypeError`` (and writes nothing) if ``state`` holds anything but
    tensors, numbers, strings, None, lists, tuples and dicts."""
    state = _plain(state, "state")
    folder = os.path.dirname(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=folder)
    try:
        with os.fdopen(descriptor, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    # The rename is durable once the folder's entry is on disk too (POSIX; elsewhere the rename is what we have).
    with contextlib.suppress(OSError, AttributeError):
        folder_descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(folder_descriptor)
        finally:
            os.close(folder_descriptor)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """The state ``save_checkpoint`` wrote to ``path``, read with ``torch.load(weights_only=True)``: tensors (on
    ``map_location``) and plain containers; a file that holds anything else raises ``pickle.UnpicklingError``."""
    return torch.load(path, map_location=map_location, weights_only=True)


def discard_partial_writes(path: str) -> list[str]:
    """Removes the temporary files a ``save_checkpoint(path, ...)`` killed before its rename left in ``path``'s folder;
    returns their paths."""
    folder = os.path.dirname(os.path.abspath(path))
    leftovers = glob.glob(os.path.join(glob.escape(folder), glob.escape(_temporary_prefix(path)) + "*.tmp"))
    for leftover in leftovers:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(leftover)
    return leftovers


def rng_states(device: torch.device | str, generators: dict[str, torch.Generator] | None = None) -> dict:
    """The states, as uint8 tensors, of torch's CPU generator (``"torch"``), the CUDA generator of ``device`` when it
    is a CUDA device (``"cuda"``), and each of ``generators`` (``"generators"``, by name)."""
    device = torch.device(device)
    states = {"torch": torch.get_rng_state(),
              "generators": {name: generator.get_state() for name, generator in (generators or {}).items()}}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict, device: torch.device | str,
                   generators: dict[str, torch.Generator] | None = None) -> None:
    """Restores what ``rng_states`` returned: torch's CPU generator, ``device``'s CUDA generator (when both the states
    and ``device`` have one) and each of ``generators``, which must be the ones saved, by name."""
    device = torch.device(device)
    generators = generators or {}
    saved = states["generators"]
    if set(saved) != set(generators):
        raise ValueError(f"the saved generator states are {sorted(saved)}, the generators to restore are "
                         f"{sorted(generators)}")
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)
    for name, generator in generators.items():
        generator.set_state(saved[name])
