"""What a member's checkpoint must hold, and an ensemble whose stacks are filled member by member.

A checkpoint is checked against the member ``build_member()`` returns: the same tensor names (its ``state_dict``
keys), and for each name the member's shape and dtype. The ensemble is built as ``FusedEnsemble([member] * N)``: its
stacks are allocated from that one member's structure, then each member's slice is overwritten from its checkpoint,
so no more than one member module is ever alive besides the stacks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from fused_ensemble.deploy.safetensors_files import TensorSpec


def build_template(build_member: Callable[[], nn.Module]) -> nn.Module:
    """One member from ``build_member()``, checked to be a module."""
    if not callable(build_member):
        raise TypeError(f"build_member must be a callable that returns a new member module, got "
                        f"{type(build_member).__name__}")
    member = build_member()
    if not isinstance(member, nn.Module):
        raise TypeError(f"build_member() must return an nn.Module, got {type(member).__name__}")
    return member


def class_name(member: nn.Module) -> str:
    """The member class's qualified name, ``module.QualName``."""
    cls = type(member)
    return f"{cls.__module__}.{cls.__qualname__}"


def member_specs(member: nn.Module) -> dict[str, TensorSpec]:
    """Name -> shape and dtype of every tensor of the member's ``state_dict``."""
    specs = {}
    for name, value in member.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"the member's state_dict holds {name!r}, a {type(value).__name__} (extra state), which "
                            f"a tensor checkpoint cannot store")
        specs[name] = TensorSpec(tuple(value.shape), value.dtype)
    return specs


def _shape(spec: TensorSpec) -> tuple[int, ...]:
    return tuple(spec.shape)


def check_member_tensors(path: Path, index: int, found: Mapping[str, TensorSpec], expected: Mapping[str, TensorSpec],
                         architecture: str) -> None:
    """Raises a ValueError naming the file, the member index and the tensor unless ``found`` (a checkpoint's
    tensors, one member's shapes) has exactly ``expected``'s names, shapes and dtypes."""
    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    if missing or unexpected:
        raise ValueError(f"{path}: member {index}: the checkpoint does not hold the tensors of the member "
                         f"build_member() builds ({architecture}): missing keys {_listed(missing)}, unexpected keys "
                         f"{_listed(unexpected)}")
    for name, spec in expected.items():
        other = found[name]
        if _shape(other) != _shape(spec):
            raise ValueError(f"{path}: member {index}: {name} has shape {_shape(other)} in the checkpoint, the member "
                             f"build_member() builds has shape {_shape(spec)}")
        if other.dtype != spec.dtype:
            raise ValueError(f"{path}: member {index}: {name} is {other.dtype} in the checkpoint, the member "
                             f"build_member() builds has {spec.dtype} (shape {_shape(spec)}); build the member in "
                             f"the checkpoint's dtype, or convert the checkpoint")


def _listed(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
    return f"[{shown}]"


def stacked_ensemble(ensemble_class: type, template: nn.Module, num_members: int, reduction: str,
                     member_inputs: bool) -> nn.Module:
    """An ensemble of ``num_members`` copies of ``template``: stacks of the right shapes, to be filled by
    ``fill_member``."""
    return ensemble_class([template] * num_members, reduction=reduction, member_inputs=member_inputs)


def fill_member(fused: nn.Module, index: int, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copies one member's checked tensors into slice ``index`` of the ensemble's stacks."""
    stacks = fused.stacked.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, tensor in tensors.items():
            stacks[name][index].copy_(tensor)


def member_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of one member's tensors (names, dtypes, shapes and bytes, in name order): what ``load`` checks each
    member it reads against, so a file whose data was damaged is refused instead of loaded."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def stacked_tensors(fused: nn.Module) -> dict[str, torch.Tensor]:
    """The fused ensemble's stacks (``fused.stacked.state_dict()``: ``[N, ...]`` under each member tensor's name),
    refusing extra state (``get_extra_state``), which a safetensors file cannot store."""
    stacks = fused.stacked.state_dict()
    for name, value in stacks.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"the members' state_dict holds {name!r}, a {type(value).__name__} (extra state), which "
                            f"a safetensors file cannot store")
    return stacks
