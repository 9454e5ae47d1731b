"""``save`` and ``load``: a ``FusedEnsemble`` as one safetensors file, and back.

The file holds the member's tensors under the member's own ``state_dict`` names, each stacked over the members (dim 0
is the member index), and metadata: the format, the number of members, the reduction, ``member_inputs``, the member
class's qualified name, the package and torch versions, and a SHA-256 digest of each member's tensors. Loading reads
the header first, checks it against a freshly built member, then reads only the requested members' slices and checks
each against its digest. No pickled code is ever executed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from fused_ensemble.deploy.member_tensors import (
    build_template,
    check_member_tensors,
    class_name,
    fill_member,
    member_digest,
    member_specs,
    stacked_ensemble,
    stacked_tensors,
)
from fused_ensemble.deploy.safetensors_files import header_specs, open_safetensors, write_safetensors
from fused_ensemble.fused import FusedEnsemble

FORMAT = "fused_ensemble.FusedEnsemble"
"""The ``format`` metadata of a file written by ``save``."""
FORMAT_VERSION = "1"


def save(fused: FusedEnsemble, path: str | os.PathLike) -> Path:
    """Writes ``fused``'s stacked parameters and buffers and what ``load`` needs to rebuild it to one safetensors file.

    The tensors keep the member's ``state_dict`` names, each ``[N, ...]`` (a stacked copy on the CPU, contiguous);
    the metadata records the number of members, the reduction, ``member_inputs``, the member class's qualified name,
    the fused_ensemble and torch versions and a SHA-256 digest of each member's tensors. The file is written through a
    temporary file: ``path`` is either complete or untouched.

    Args:
        fused: the ensemble (an ``OptimizedEnsemble`` is a tuned snapshot, not a checkpoint: save the
            ``FusedEnsemble`` it came from).
        path: the file to write, conventionally ``*.safetensors``.

    Returns:
        The path written.
    """
    import fused_ensemble

    if not isinstance(fused, FusedEnsemble):
        raise TypeError(f"save() takes a FusedEnsemble, got a {type(fused).__name__}; an OptimizedEnsemble is tuned "
                        f"for one process: save the FusedEnsemble it was made from")
    path = Path(path)
    stacks = stacked_tensors(fused)
    tensors = {name: stack.detach().to("cpu").contiguous() for name, stack in stacks.items()}
    digests = [member_digest({name: stack[index] for name, stack in tensors.items()})
               for index in range(fused.num_members)]
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "num_members": str(fused.num_members),
        "reduction": fused.reduction,
        "member_inputs": json.dumps(fused.member_inputs),
        "member_class": class_name(fused.stacked),
        "fused_ensemble_version": fused_ensemble.__version__,
        "torch_version": torch.__version__,
        "member_digests": json.dumps(digests),
    }
    write_safetensors(tensors, path, metadata)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a safetensors file (empty if it has none), from its header."""
    with open_safetensors(Path(path)) as handle:
        return dict(handle.metadata() or {})


def _metadata(path: Path, metadata: dict[str, str] | None) -> tuple[int, str, bool, str, list[str]]:
    """(number of members, reduction, member_inputs, member class, digests) from a file's metadata."""
    metadata = metadata or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path}: not a fused_ensemble checkpoint (its metadata has no format "
                         f"{FORMAT!r}); a file of one member's tensors is read by FusedEnsemble.from_checkpoints")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format version {metadata.get('format_version')!r}; this fused_ensemble "
                         f"reads version {FORMAT_VERSION} (written by fused_ensemble "
                         f"{metadata.get('fused_ensemble_version', '?')})")
    try:
        num_members = int(metadata["num_members"])
        member_inputs = json.loads(metadata["member_inputs"])
        digests = json.loads(metadata["member_digests"])
        reduction, member_class = metadata["reduction"], metadata["member_class"]
    except (KeyError, ValueError) as error:
        raise ValueError(f"{path}: corrupted fused_ensemble metadata ({type(error).__name__}: {error})") from None
    if (num_members < 1 or not isinstance(member_inputs, bool) or not isinstance(digests, list)
            or len(digests) != num_members):
        raise ValueError(f"{path}: corrupted fused_ensemble metadata (num_members={num_members}, "
                         f"{len(digests) if isinstance(digests, list) else 'no'} member digests)")
    return num_members, reduction, member_inputs, member_class, digests


def _selected(path: Path, members: Sequence[int] | None, num_members: int) -> list[int]:
    if members is None:
        return list(range(num_members))
    if isinstance(members, (str, bytes)) or not isinstance(members, Sequence):
        raise TypeError(f"members must be a list of member indices, got {type(members).__name__}")
    selected = list(members)
    if not selected:
        raise ValueError(f"{path}: members=[] selects no member")
    for index in selected:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"members must hold ints, got {index!r}")
        if not 0 <= index < num_members:
            raise ValueError(f"{path}: members={selected} asks for member {index}, but the file holds {num_members} "
                             f"members (0 to {num_members - 1})")
    if len(set(selected)) != len(selected):
        raise ValueError(f"{path}: members={selected} names a member twice")
    return selected


def load(path: str | os.PathLike, build_member: Callable[[], nn.Module], members: Sequence[int] | None = None,
         device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> FusedEnsemble:
    """The ``FusedEnsemble`` that ``save`` wrote to ``path``, or a subset of its members.

    Args:
        path: a file written by ``save``.
        build_member: a function that returns one freshly built member of the architecture (random weights are
            fine: they are overwritten). It is called once; its module's mode (training or eval) is the ensemble's.
        members: the indices of the members to load, in that order (e.g. ``[0, 3, 5]``), or None for all. Only
            their slices of the file are read.
        device: where to build the ensemble (default: where ``build_member()`` builds the member).
        dtype: a floating-point dtype to cast the floating-point tensors to after loading (default: the file's).

    Returns:
        The ensemble, with the saved reduction and ``member_inputs``; its tensors equal the saved ones bit for bit
        (unless ``dtype`` casts them).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a safetensors file, is truncated, corrupted (a header safetensors refuses, or a
            member whose tensors do not match their digest) or not a fused_ensemble checkpoint; the member class or
            its tensors differ from the checkpoint's (the message names the file, the member, the tensor and both
            shapes or dtypes); ``members`` names a member the file does not hold, or one twice. Nothing is returned
            half-loaded.
    """
    path = Path(path)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
    with open_safetensors(path) as handle:
        num_members, reduction, member_inputs, member_class, digests = _metadata(path, handle.metadata())
        specs = header_specs(handle)
        for name, spec in specs.items():
            if not spec.shape or spec.shape[0] != num_members:
                raise ValueError(f"{path}: {name} has shape {spec.shape}, but the file says it stacks "
                                 f"{num_members} members: the file is corrupted")
        selected = _selected(path, members, num_members)
        template = build_template(build_member)
        built_class = class_name(template)
        if member_class != built_class and not member_class.endswith("." + type(template).__qualname__):
            raise ValueError(f"{path}: the checkpoint holds {member_class} members, build_member() builds a "
                             f"{built_class}")
        check_member_tensors(path, selected[0], {name: spec.without_member_dim() for name, spec in specs.items()},
                             member_specs(template), built_class)
        if device is not None:
            template = template.to(device)
        fused = stacked_ensemble(FusedEnsemble, template, len(selected), reduction, member_inputs)
        del template
        for position, index in enumerate(selected):
            tensors = {name: handle.get_slice(name)[index] for name in specs}
            if member_digest(tensors) != digests[index]:
                raise ValueError(f"{path}: member {index}: its tensors do not match the digest recorded when the "
                                 f"file was written: the file is corrupted")
            fill_member(fused, position, tensors)
    if dtype is not None:
        fused.to(dtype)
    return fused
