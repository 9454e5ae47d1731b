"""The layouts of a fused forward's inputs: shared by every member, or one per member (``member_inputs=True``),
and ``shared()``, which marks an input that every member sees whole even when the others are per member."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from fused_ensemble.fusion.layout import Layout


class SharedInput:
    """An input of a fused ensemble that every member sees whole (made by ``fused_ensemble.shared``)."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value.value if isinstance(value, SharedInput) else value

    def __repr__(self) -> str:
        return f"shared({self.value!r})"


def shared(value: Any) -> SharedInput:
    """Marks ``value`` (a tensor, or a tuple, list or dict of them) as one input that every member of a
    ``FusedEnsemble(member_inputs=True)`` sees whole, such as an attention mask ``[L, L]``:
    ``fused(x, mask=fused_ensemble.shared(mask))``. Its leading dim is never taken for the member dim, even when
    it equals the number of members. With ``member_inputs=False`` every input is shared already, and
    ``shared(value)`` is the same as ``value``. Wrap an input whole: a tuple of which some tensors are per member
    and some shared is not supported."""
    return SharedInput(value)


def with_layouts(inputs: tuple, keyword_inputs: dict, member_inputs: bool, num_members: int
                 ) -> tuple[list[tuple[Any, Layout]], dict[str, tuple[Any, Layout]]]:
    """Each input as ``(value, layout)``: ``shared(...)`` inputs and, without ``member_inputs``, every input as
    ``Layout.SHARED``; with ``member_inputs`` every other input that holds tensors as ``Layout.MEMBER``, after
    checking that each of its tensors has the member dim first. Raises a ValueError naming the input otherwise."""
    positional = [_with_layout(repr(position), x, member_inputs, num_members) for position, x in enumerate(inputs)]
    keywords = {name: _with_layout(name, x, member_inputs, num_members) for name, x in keyword_inputs.items()}
    return positional, keywords


def _with_layout(name: str, x: Any, member_inputs: bool, num_members: int) -> tuple[Any, Layout]:
    if isinstance(x, SharedInput):
        _refuse_nested_shared(name, x.value)
        return x.value, Layout.SHARED
    if isinstance(x, torch.Tensor):
        tensors = [x]
    else:
        leaves, _ = tree_flatten(x)
        _refuse_nested_shared(name, leaves)
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    if not member_inputs or not tensors:
        return x, Layout.SHARED
    for tensor in tensors:
        if tensor.dim() == 0 or tensor.shape[0] != num_members:
            what = f"input {name}" if tensor is x else f"every tensor of input {name}"
            raise ValueError(f"member_inputs=True expects {what} of shape [N, B, ...] with N={num_members} members, "
                             f"got {tuple(tensor.shape)}; pass an input that every member sees whole as "
                             f"fused_ensemble.shared(value)")
    return x, Layout.MEMBER


def _refuse_nested_shared(name: str, value: Any) -> None:
    leaves, _ = tree_flatten(value)
    if any(isinstance(leaf, SharedInput) for leaf in leaves):
        raise TypeError(f"input {name}: fused_ensemble.shared() wraps a whole input, not a part of one (a tuple whose "
                        f"tensors are partly per member and partly shared is not supported)")
