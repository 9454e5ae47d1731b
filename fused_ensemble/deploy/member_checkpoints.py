"""N per-member checkpoints in (``FusedEnsemble.from_checkpoints``) and out (``FusedEnsemble.save_members``).

A member checkpoint is what users have: a safetensors file, or a torch file holding a bare ``state_dict`` or one under
a ``"state_dict"``, ``"model"`` or ``"module"`` key, with or without the ``"module."`` prefix that
``DataParallel``/``DistributedDataParallel`` add. Torch files are read with ``torch.load(weights_only=True)`` and no
fallback, so no pickled code runs. The format is told from the file's first bytes, not its name.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from fused_ensemble.deploy.member_tensors import (
    build_template,
    check_member_tensors,
    class_name,
    fill_member,
    member_specs,
    stacked_ensemble,
    stacked_tensors,
)
from fused_ensemble.deploy.safetensors_files import (
    TensorSpec,
    header_specs,
    looks_like_safetensors,
    open_safetensors,
    write_safetensors,
)

STATE_DICT_KEYS = ("state_dict", "model", "module")
"""Keys under which training scripts commonly store the model's ``state_dict`` in a checkpoint dict."""
WRAPPER_PREFIX = "module."
"""What ``DataParallel``/``DistributedDataParallel`` put before every key of the wrapped model's ``state_dict``."""
MEMBER_FORMAT = "fused_ensemble.member"


def _is_state_dict(value) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(
        isinstance(key, str) and isinstance(tensor, torch.Tensor) for key, tensor in value.items())


def _state_dict_in(loaded, path: Path, index: int) -> dict[str, torch.Tensor]:
    """The member's state_dict in what ``torch.load`` returned, with a DataParallel prefix removed."""
    if _is_state_dict(loaded):
        state = dict(loaded)
    else:
        nested = [key for key in STATE_DICT_KEYS if isinstance(loaded, Mapping) and _is_state_dict(loaded.get(key))]
        if not nested:
            found = (f"a dict with keys {sorted(map(str, loaded))[:10]}" if isinstance(loaded, Mapping)
                     else f"a {type(loaded).__name__}")
            raise ValueError(f"{path}: member {index}: holds {found}, not a state_dict: expected a dict of tensors, or "
                             f"one under a {', '.join(repr(k) for k in STATE_DICT_KEYS)} key")
        state = dict(loaded[nested[0]])
    if all(key.startswith(WRAPPER_PREFIX) for key in state):
        state = {key[len(WRAPPER_PREFIX):]: tensor for key, tensor in state.items()}
    return state


def _unreadable(path: Path, index: int, error: Exception) -> ValueError:
    detail = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    if "WeightsUnpickler error" in str(error):
        detail = "not a pickle torch.load knows"
    return ValueError(f"{path}: member {index}: neither a safetensors file nor a torch file that "
                      f"torch.load(weights_only=True) can read ({type(error).__name__}: {detail})")


def _torch_file(path: Path, index: int) -> dict[str, torch.Tensor]:
    try:
        # mmap (zip files only): the tensors are read from the file as they are copied into the stacks.
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if refused is None:
            raise _unreadable(path, index, error) from None
        raise ValueError(f"{path}: member {index}: torch.load(weights_only=True) refuses it: it needs the "
                         f"Python global {refused[1]} (objects that only running pickled code could rebuild, which "
                         f"fused_ensemble never does); re-save the model's state_dict, or convert it to "
                         f"safetensors") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise _unreadable(path, index, error) from None
    return _state_dict_in(loaded, path, index)


def read_member_checkpoint(path: Path, index: int, expected: Mapping[str, TensorSpec],
                           architecture: str) -> dict[str, torch.Tensor]:
    """Member ``index``'s tensors from ``path``, checked against ``expected`` (the built member's) before use."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (member {index})")
    if looks_like_safetensors(path):
        with open_safetensors(path) as handle:
            check_member_tensors(path, index, header_specs(handle), expected, architecture)
            return {name: handle.get_tensor(name) for name in expected}
    state = _torch_file(path, index)
    found = {name: TensorSpec(tuple(tensor.shape), tensor.dtype) for name, tensor in state.items()}
    check_member_tensors(path, index, found, expected, architecture)
    return state


def ensemble_from_checkpoints(ensemble_class: type, paths: Iterable[str | os.PathLike],
                              build_member: Callable[[], nn.Module], reduction: str = "mean_probs",
                              member_inputs: bool = False) -> nn.Module:
    """``FusedEnsemble.from_checkpoints``: the ensemble of the members stored in ``paths`` (member i from
    ``paths[i]``), built as ``ensemble_class``."""
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise TypeError("paths must be a list of checkpoint files, one per member, got a single path")
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("from_checkpoints needs at least one checkpoint file, got none")
    for index, path in enumerate(paths):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (member {index})")
    template = build_template(build_member)
    expected, architecture = member_specs(template), class_name(template)
    first = read_member_checkpoint(paths[0], 0, expected, architecture)  # checked before the stacks are allocated
    fused = stacked_ensemble(ensemble_class, template, len(paths), reduction, member_inputs)
    del template
    fill_member(fused, 0, first)
    del first
    for index, path in enumerate(paths[1:], start=1):
        fill_member(fused, index, read_member_checkpoint(path, index, expected, architecture))
    return fused


def save_members(fused: nn.Module, folder: str | os.PathLike) -> list[Path]:
    """``FusedEnsemble.save_members``: member i's tensors to ``folder/member_<i>.safetensors`` (``i`` zero-padded to
    the width of the largest index), each readable with ``member.load_state_dict(safetensors.torch.load_file(p))``."""
    import fused_ensemble

    folder = Path(folder)
    stacks = stacked_tensors(fused)
    width = len(str(fused.num_members - 1))
    written = []
    for index in range(fused.num_members):
        tensors = {name: stack[index].detach().to("cpu", copy=True).contiguous() for name, stack in stacks.items()}
        path = folder / f"member_{index:0{width}d}.safetensors"
        write_safetensors(tensors, path, {"format": MEMBER_FORMAT, "member_index": str(index),
                                          "num_members": str(fused.num_members),
                                          "member_class": class_name(fused.stacked),
                                          "fused_ensemble_version": fused_ensemble.__version__})
        written.append(path)
    return written
