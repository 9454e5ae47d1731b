"""Checking that N members can be fused, stacking their tensors, and splitting them apart again.

The fused network keeps a copy of member 0's module tree in which every parameter and buffer is replaced by the
stack of all members' tensors (dim 0 is the member index). Splitting copies that tree once per member with the
stacked tensors swapped for slices, so the members come back with the same keys, order and values.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Iterable

import torch
from torch import nn

from fused_ensemble.fusion.configuration import MemberIndex, first_difference


def check_members(members: Iterable[nn.Module]) -> list[nn.Module]:
    """Returns the members as a list, or raises a TypeError/ValueError naming the first member that differs."""
    if isinstance(members, nn.Module) and not isinstance(members, (nn.ModuleList, nn.Sequential)):
        raise TypeError("members must be a sequence of nn.Modules (e.g. a list or nn.ModuleList), got a single "
                        f"{type(members).__name__}")
    members = list(members)
    if not members:
        raise ValueError("FusedEnsemble needs at least one member, got an empty list")
    for i, member in enumerate(members):
        if not isinstance(member, nn.Module):
            raise TypeError(f"member {i} is a {type(member).__name__}, not an nn.Module")
        _check_no_reparametrization(i, member)
        _check_no_hooks(i, member)
    _check_no_tied_tensors(members[0])
    reference = members[0]
    reference_index = MemberIndex(reference)
    for i, member in enumerate(members[1:], start=1):
        if type(member) is not type(reference):
            raise TypeError(f"member {i} is a {type(member).__qualname__}, member 0 is a "
                            f"{type(reference).__qualname__}; all members must share one architecture")
        # Structure first, then tensors (the most precise message for a size mismatch), then mode and configuration.
        _check_same_structure(i, member, reference)
        _check_same_tensors(i, "parameter", dict(member.named_parameters()), dict(reference.named_parameters()))
        _check_same_tensors(i, "buffer", dict(member.named_buffers()), dict(reference.named_buffers()))
        _check_same_mode(i, member, reference)
        _check_same_configuration(i, member, reference, reference_index)
    return members


def _where(path: str, module: nn.Module) -> str:
    """How an error names a module of a member: ``'encoder.layers.0' (TransformerEncoderLayer)``."""
    return f"'{path}' ({type(module).__name__})" if path else f"the root module ({type(module).__name__})"


def _check_no_reparametrization(index: int, member: nn.Module) -> None:
    """Weights computed from other tensors at each call (torch.nn.utils.parametrize, the old weight_norm hook)
    cannot be stacked: the computation would run on the [N, ...] stacks, with the wrong dims for its norms."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    for path, module in member.named_modules():
        where = f"'{path}'" if path else "its root module"
        if parametrize.is_parametrized(module):
            raise TypeError(f"member {index}: {where} is parametrized (torch.nn.utils.parametrize: weight_norm, "
                            f"spectral_norm, orthogonal, ...), which FusedEnsemble cannot stack; bake the weights "
                            f"in first with torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight')")
        if any(isinstance(hook, WeightNorm) for hook in module._forward_pre_hooks.values()):
            raise TypeError(f"member {index}: {where} uses torch.nn.utils.weight_norm, which FusedEnsemble cannot "
                            f"stack; bake the weights in first with torch.nn.utils.remove_weight_norm(layer)")
        if any(isinstance(hook, SpectralNorm) for hook in module._forward_pre_hooks.values()):
            raise TypeError(f"member {index}: {where} uses torch.nn.utils.spectral_norm, which FusedEnsemble cannot "
                            f"stack; bake the weights in first with torch.nn.utils.remove_spectral_norm(layer)")


_HOOK_KINDS = (("_forward_hooks", "forward hook"), ("_forward_pre_hooks", "forward pre-hook"),
               ("_backward_hooks", "backward hook"), ("_backward_pre_hooks", "backward pre-hook"))


_HOOK_STATE = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def _check_no_hooks(index: int, member: nn.Module) -> None:
    """The fused network runs one module tree for all members: hooks on the members would either run member 0's
    for everyone or be dropped. The fused module's own modules take hooks, seeing every member's values."""
    for path, module in member.named_modules():
        for attribute, kind in _HOOK_KINDS:
            if getattr(module, attribute):
                target = f"fused.stacked.get_submodule({path!r})" if path else "fused.stacked"
                raise TypeError(f"member {index}: {_where(path, module)} has a {kind}, which FusedEnsemble would not "
                                f"run for each member; remove the members' hooks and register them on the fused "
                                f"module's {target} instead (they then see every member's values stacked, "
                                f"[N, B, ...]; see fused_ensemble.fusion.hooks)")


def _check_same_mode(index: int, member: nn.Module, reference: nn.Module) -> None:
    theirs = dict(reference.named_modules())
    for path, module in member.named_modules():
        if module.training != theirs[path].training:
            mode, other = ("train", "eval") if module.training else ("eval", "train")
            raise ValueError(f"member {index}: {_where(path, module)} is in {mode} mode, member 0 is in {other} "
                             f"mode; put every member in one mode (.train() or .eval()) before fusing")


def _check_no_tied_tensors(member: nn.Module) -> None:
    seen = {}
    for name, tensor in list(member.named_parameters(remove_duplicate=False)) + list(
            member.named_buffers(remove_duplicate=False)):
        if id(tensor) in seen:
            raise ValueError(f"member 0: {name} is the same tensor as {seen[id(tensor)]}; tied parameters are not "
                             f"supported by FusedEnsemble")
        seen[id(tensor)] = name


def _check_same_names(index: int, what: str, ours: dict, theirs: dict) -> None:
    if list(ours) != list(theirs):
        missing = [name for name in theirs if name not in ours]
        extra = [name for name in ours if name not in theirs]
        raise ValueError(f"member {index}: {what} differ from member 0 (missing {missing}, extra {extra})")


def _check_same_structure(index: int, member: nn.Module, reference: nn.Module) -> None:
    ours = dict(member.named_modules())
    theirs = dict(reference.named_modules())
    _check_same_names(index, "submodules", ours, theirs)
    for path, module in ours.items():
        other = theirs[path]
        if type(module) is not type(other):
            raise TypeError(f"member {index}: {path or '<root>'} is a {type(module).__qualname__}, member 0 has a "
                            f"{type(other).__qualname__}")


def _check_same_configuration(index: int, member: nn.Module, reference: nn.Module, reference_index: MemberIndex,
                              theirs: str = "member 0 has", ignore: frozenset[str] = frozenset()) -> None:
    """Every module's non-tensor state equal to the same module's in ``reference`` (see configuration.py)."""
    references = dict(reference.named_modules())
    member_index = MemberIndex(member)
    for path, module in member.named_modules():
        difference = first_difference(module, references[path], member_index, reference_index, ignore)
        if difference is not None:
            raise ValueError(f"member {index}: {_where(path, module)} {difference.describe(theirs)}")


def _check_same_tensors(index: int, kind: str, ours: dict, theirs: dict) -> None:
    _check_same_names(index, f"{kind} names", ours, theirs)
    for name, tensor in ours.items():
        other = theirs[name]
        for attribute in ("shape", "dtype", "device"):
            mine, ref = getattr(tensor, attribute), getattr(other, attribute)
            if mine != ref:
                if attribute == "shape":
                    mine, ref = tuple(mine), tuple(ref)
                raise ValueError(f"member {index}: {name} has {attribute} {mine}, member 0 has {ref}")
        if kind == "parameter" and tensor.requires_grad != other.requires_grad:
            raise ValueError(f"member {index}: {name} has requires_grad={tensor.requires_grad}, member 0 has "
                             f"{other.requires_grad}")


def check_replacement(stacked: nn.Module, member: nn.Module, index: int) -> None:
    """Raises a TypeError/ValueError unless ``member`` can replace member ``index`` of ``stacked``: the same module
    types and configuration, tensor names, and each tensor of one member's shape and dtype (any device)."""
    if type(member) is not type(stacked):
        raise TypeError(f"member {index}: the replacement is a {type(member).__qualname__}, the members are "
                        f"{type(stacked).__qualname__}s")
    _check_no_hooks(index, member)
    _check_no_tied_tensors(member)
    _check_same_structure(index, member, stacked)
    for kind, ours, theirs in (("parameter", dict(member.named_parameters()), dict(stacked.named_parameters())),
                               ("buffer", dict(member.named_buffers()), dict(stacked.named_buffers()))):
        _check_same_names(index, f"{kind} names", ours, theirs)
        for name, tensor in ours.items():
            expected = theirs[name]
            if tuple(tensor.shape) != tuple(expected.shape[1:]) or tensor.dtype != expected.dtype:
                raise ValueError(f"member {index}: the replacement's {name} is {tensor.dtype} of shape "
                                 f"{tuple(tensor.shape)}, the members' are {expected.dtype} of shape "
                                 f"{tuple(expected.shape[1:])}")
    _check_same_configuration(index, member, stacked, MemberIndex(stacked), "the members have",
                              ignore=_STACKING_STATE)


def _owner(root: nn.Module, qualified_name: str) -> tuple[nn.Module, str]:
    path, _, attribute = qualified_name.rpartition(".")
    return (root.get_submodule(path) if path else root), attribute


def stack_members(members: list[nn.Module]) -> nn.Module:
    """A copy of member 0's module tree whose parameters and buffers are the stacks of all members' tensors."""
    stacked = copy.deepcopy(members[0])
    with torch.no_grad():
        for name, parameter in members[0].named_parameters():
            owner, attribute = _owner(stacked, name)
            values = torch.stack([member.get_parameter(name).detach() for member in members])
            owner._parameters[attribute] = nn.Parameter(values, requires_grad=parameter.requires_grad)
        for name, _ in members[0].named_buffers():
            owner, attribute = _owner(stacked, name)
            owner._buffers[attribute] = torch.stack([member.get_buffer(name).detach() for member in members])
    for module in stacked.modules():
        if isinstance(module, nn.RNNBase):
            # Its weight list must name the stacks (they were swapped in behind its __setattr__), and it must never
            # pack them: flatten_parameters (on .to("cuda")) would treat the [N, ...] stacks as one layer's
            # weights. recurrent.py calls each member's slices instead.
            module.flatten_parameters = _keep_weights_unpacked
            module._init_flat_weights()
    return stacked


_STACKING_STATE = frozenset({"flatten_parameters"})
"""What stack_members adds to the stacked modules' state (and unstack_member takes away)."""


def _keep_weights_unpacked() -> None:
    """flatten_parameters of a stacked recurrent layer: nothing to pack (see stack_members)."""


def with_member_memory_format(stacked: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """``stacked`` (dim 0 = member) with every member's slice laid out as ``member_tensor.to(memory_format=...)``
    lays out one member's tensor, the member dim outermost: channels_last conv weights ``[N, O, I, kh, kw]`` then
    flatten to the grouped convolution's channels_last ``[N * O, I, kh, kw]`` weight. As ``nn.Module.to`` does,
    only 4-D and 5-D member tensors change, and a format of another rank raises torch's own error."""
    if stacked.dim() - 1 not in (4, 5):
        return stacked
    member_strides = torch.empty(stacked.shape[1:], device="meta", memory_format=memory_format).stride()
    laid_out = torch.empty_strided(stacked.shape, (math.prod(stacked.shape[1:]), *member_strides),
                                   dtype=stacked.dtype, device=stacked.device)
    return laid_out.copy_(stacked)


def unstack_member(stacked: nn.Module, index: int) -> nn.Module:
    """Member ``index`` as an ordinary module: the same tree with every stacked tensor replaced by a copy of its
    slice (so the result owns its memory and its state_dict matches the original member's bit for bit)."""
    memo = {}
    with torch.no_grad():
        for parameter in stacked.parameters():
            memo[id(parameter)] = nn.Parameter(parameter[index].clone(), requires_grad=parameter.requires_grad)
        for buffer in stacked.buffers():
            memo[id(buffer)] = buffer[index].clone()
    member = copy.deepcopy(stacked, memo)
    for module in member.modules():
        # Hooks registered on the fused module's modules see [N, B, ...] values: they are not the member's.
        for attribute in _HOOK_STATE:
            setattr(module, attribute, OrderedDict())
        module._is_full_backward_hook = None
        if isinstance(module, nn.RNNBase):  # an ordinary layer again: its own flatten_parameters, its own weights
            for name in _STACKING_STATE:
                module.__dict__.pop(name, None)
            module._init_flat_weights()
    return member


def member_index(member: int, num_members: int) -> int:
    """``member`` checked against an ensemble of ``num_members`` (negative counts from the end), as 0..N-1."""
    if isinstance(member, bool) or not isinstance(member, int):
        raise TypeError(f"member must be an int, got {type(member).__name__}")
    if not -num_members <= member < num_members:
        raise IndexError(f"member {member} is out of range for an ensemble of {num_members} members")
    return member % num_members
