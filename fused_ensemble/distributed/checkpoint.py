"""Checkpoints of sharded ensembles through ``torch.distributed.checkpoint``, readable by any layout of ranks.

Every member's tensors are stored under keys of their own (``member/<index>/<name>``, and the optimizer's state under
``optimizer/<index>/<parameter>/<key>``), each written by the rank that holds the member. A reader asks for the
members it holds, whatever layout wrote them: a checkpoint written by 2 ranks loads on 3 ranks, or in a plain
process as a ``FusedEnsemble`` of all members, bit for bit. The ensemble's own description (N, reduction,
member_inputs, the member's tensor names) is a small JSON file beside the tensors, ``ensemble.json``, written last:
a folder without it is not a finished checkpoint.

Loading runs no pickled code: the tensors are read by ``torch.distributed.checkpoint``'s reader, which uses
``torch.load(weights_only=True)``, and its index file (``.metadata``, a pickle) is read here by an unpickler that
builds the checkpoint index's own classes, dtypes, sizes and paths and refuses anything else.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import tempfile
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from fused_ensemble.distributed.sharded import ShardedEnsemble
from fused_ensemble.fused import FusedEnsemble

__all__ = ["METADATA_FILE", "save", "load", "load_state", "load_extra", "read_metadata",
           "CheckpointReader"]

METADATA_FILE = "ensemble.json"
FORMAT = "fused_ensemble sharded ensemble"
VERSION = 1

_INDEX_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "TensorProperties",
                                              "_MEM_FORMAT_ENCODING", "ChunkStorageMetadata", "MetadataIndex",
                                              "StorageMeta", "BytesStorageMetadata"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _IndexUnpickler(pickle.Unpickler):
    """Builds a ``torch.distributed.checkpoint`` index and nothing else."""

    def find_class(self, module: str, name: str):
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name in _INDEX_CLASSES.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"a checkpoint index may not build {module}.{name}: refused")


class CheckpointReader(dcp.FileSystemReader):
    """``torch.distributed.checkpoint.FileSystemReader`` whose index is read by a restricted unpickler (see the
    module doc); the tensors are read as its parent reads them, with ``torch.load(weights_only=True)``."""

    def read_metadata(self, *args, **kwargs):
        with open(os.path.join(self.path, ".metadata"), "rb") as f:
            metadata = _IndexUnpickler(f).load()
        storage_meta = getattr(metadata, "storage_meta", None)
        if storage_meta is not None:
            storage_meta.load_id = getattr(self, "load_id", None)
        return metadata


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _one_process_is_meant():
    """Saving or loading in one process is what ``no_dist=True`` asks for; torch warns that it assumes so all the
    same."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _members(model) -> tuple[FusedEnsemble, range]:
    if isinstance(model, ShardedEnsemble):
        return model.local, model.member_indices
    if isinstance(model, FusedEnsemble):
        return model, range(model.num_members)
    raise TypeError(f"expected a ShardedEnsemble or a FusedEnsemble, got {type(model).__name__}")


def _member_tensors(fused: FusedEnsemble) -> list[tuple[str, torch.Tensor]]:
    """The stacked tensors of ``fused`` under the member's own names (without the ``stacked.`` prefix)."""
    return list(fused.stacked.named_parameters()) + list(fused.stacked.named_buffers())


def save(model: ShardedEnsemble | FusedEnsemble, folder: str, optimizer: torch.optim.Optimizer | None = None,
         extra: dict[str, torch.Tensor] | None = None) -> None:
    """Writes the members of ``model`` to ``folder`` (created if missing), with ``optimizer``'s per-member state
    (moments, momentum buffers, step counts; its hyperparameters are not saved: build the optimizer, and its
    scheduler, as before) and ``extra`` tensors (``load_extra``; a name written by several ranks must hold the same
    tensor on each). Collective on a ``ShardedEnsemble``: every rank of the default group calls it. Rank 0 writes
    ``ensemble.json`` once every rank's tensors are on disk."""
    fused, indices = _members(model)
    state = {}
    with torch.no_grad():
        for name, stacked in _member_tensors(fused):
            for position, index in enumerate(indices):
                state[f"member/{index}/{name}"] = stacked[position].detach().clone()
        if optimizer is not None:
            for name, parameter in fused.stacked.named_parameters():
                for key, value in optimizer.state.get(parameter, {}).items():
                    if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != len(indices):
                        raise ValueError(f"optimizer state {key!r} of {name} is not a per-member tensor [N, ...]")
                    for position, index in enumerate(indices):
                        state[f"optimizer/{index}/{name}/{key}"] = value[position].detach().clone()
    for name, tensor in (extra or {}).items():
        state[f"extra/{name}"] = tensor.detach().clone()
    distributed = _distributed()
    with _one_process_is_meant():
        dcp.save(state, checkpoint_id=folder, no_dist=not distributed)
    if distributed and dist.get_rank() != 0:
        return
    description = {"format": FORMAT, "version": VERSION, "num_members": model.num_members,
                   "reduction": model.reduction, "member_inputs": model.member_inputs,
                   "tensors": [name for name, _ in _member_tensors(fused)], "optimizer": optimizer is not None}
    _write_json_atomically(os.path.join(folder, METADATA_FILE), description)


def _write_json_atomically(path: str, value: dict) -> None:
    descriptor, temporary = tempfile.mkstemp(prefix=".ensemble.", suffix=".tmp", dir=os.path.dirname(path))
    with os.fdopen(descriptor, "w") as f:
        json.dump(value, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def read_metadata(folder: str) -> dict:
    """The description ``save`` wrote beside the tensors (``ensemble.json``), after checking its format."""
    path = os.path.join(folder, METADATA_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder} holds no finished sharded-ensemble checkpoint: {METADATA_FILE} is missing")
    with open(path) as f:
        description = json.load(f)
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fused_ensemble sharded-ensemble checkpoint description")
    if description.get("version") != VERSION:
        raise ValueError(f"{path} has version {description.get('version')}; this package reads version {VERSION}")
    return description


def _load_into(state: dict[str, torch.Tensor], folder: str) -> None:
    with _one_process_is_meant():
        dcp.load(state, storage_reader=CheckpointReader(folder), no_dist=not _distributed())


def load(folder: str, build_member, mesh=None) -> ShardedEnsemble | FusedEnsemble:
    """The ensemble ``save`` wrote to ``folder``: a ``ShardedEnsemble`` over ``mesh`` (default: every process along
    ``"member"``) when a process group is initialized, each rank reading its members only; else a ``FusedEnsemble``
    of all N members. ``build_member(index)`` builds the members (their values are then replaced by the saved ones,
    bit for bit); N, the reduction and member_inputs come from the checkpoint. Collective when distributed."""
    description = read_metadata(folder)
    CheckpointReader(folder).read_metadata()  # a refused index raises here, before any member is built
    n, reduction, member_inputs = (description["num_members"], description["reduction"],
                                   description["member_inputs"])
    if _distributed():
        model = ShardedEnsemble(build_member, n, mesh, reduction=reduction, member_inputs=member_inputs)
    else:
        model = FusedEnsemble([build_member(index) for index in range(n)], reduction=reduction,
                              member_inputs=member_inputs)
    load_state(folder, model)
    return model


def _stored_tensor(metadata, key: str, device) -> torch.Tensor:
    entry = metadata.state_dict_metadata[key]
    return torch.empty(tuple(entry.size), dtype=entry.properties.dtype, device=device)


def load_state(folder: str, model: ShardedEnsemble | FusedEnsemble,
               optimizer: torch.optim.Optimizer | None = None) -> None:
    """Replaces, in place, the values of ``model``'s members (a ``ShardedEnsemble``'s members on this rank, or every
    member of a ``FusedEnsemble``) by those ``save`` wrote to ``folder``, and with ``optimizer`` (built over
    ``model``'s parameters, as by ``sharded.optimizer``) its per-member state too. ``model`` must have the
    checkpoint's N and members of its architecture. Collective when distributed."""
    description = read_metadata(folder)
    fused, indices = _members(model)
    if model.num_members != description["num_members"]:
        raise ValueError(f"{folder} holds {description['num_members']} members, the ensemble has {model.num_members}")
    tensors = _member_tensors(fused)
    names = [name for name, _ in tensors]
    if names != description["tensors"]:
        missing = [name for name in description["tensors"] if name not in names]
        extra = [name for name in names if name not in description["tensors"]]
        raise ValueError(f"the members do not match the checkpoint's: tensors missing {missing}, not in the "
                         f"checkpoint {extra}")
    if optimizer is not None and not description["optimizer"]:
        raise ValueError(f"{folder} was saved without an optimizer state")
    # Views of the stacked tensors: the reader copies every member's values in place.
    state = {f"member/{index}/{name}": stacked.detach()[position]
             for name, stacked in tensors for position, index in enumerate(indices)}
    layout = {}
    if optimizer is not None:
        metadata = CheckpointReader(folder).read_metadata()
        stored = list(metadata.state_dict_metadata)
        for name, parameter in fused.stacked.named_parameters():
            prefix = f"optimizer/{indices[0]}/{name}/"
            layout[name] = [key[len(prefix):] for key in stored if key.startswith(prefix)]
            for key in layout[name]:
                for index in indices:
                    full = f"optimizer/{index}/{name}/{key}"
                    state[full] = _stored_tensor(metadata, full, parameter.device)
    _load_into(state, folder)
    if optimizer is not None:
        for name, parameter in fused.stacked.named_parameters():
            optimizer.state[parameter] = {key: torch.stack([state[f"optimizer/{index}/{name}/{key}"]
                                                            for index in indices]) for key in layout[name]}


def load_extra(folder: str, names: list[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The ``extra`` tensors ``save`` wrote under ``names``. Collective when distributed (every rank may ask for
    other names)."""
    metadata = CheckpointReader(folder).read_metadata()
    missing = [name for name in names if f"extra/{name}" not in metadata.state_dict_metadata]
    if missing:
        raise KeyError(f"{folder} holds no extra tensors {missing}")
    state = {f"extra/{name}": _stored_tensor(metadata, f"extra/{name}", device) for name in names}
    _load_into(state, folder)
    return {name: state[f"extra/{name}"] for name in names}

