"""Whether two members' modules are configured alike: every value a module keeps that is not a parameter, buffer or
submodule (what its forward may read: ``num_heads``, ``batch_first``, an activation function, a float, a flag, a
tensor constant), compared structurally.

The fused network runs member 0's module tree for every member, with the stacked tensors swapped in: any other
difference between members would be silently lost. A module's state is its ``__dict__`` less nn.Module's own
bookkeeping (parameters, buffers and submodules, which the stacking checks compare; hooks and the ``training`` flag,
which have checks of their own). Values compare as:

- numbers, strings, bools and None by type and value (NaN equals NaN);
- tuples, lists, sets and dicts item by item;
- functions and classes by identity; a function made per instance (a lambda in ``__init__``) by its code, defaults
  and the values it closes over; ``functools.partial`` by its function, arguments and keywords;
- tensors that are a member's own parameters or buffers (an RNN's ``_flat_weights``, weak references to them) and
  modules of its own tree by which ones they are; any other tensor by shape, dtype, device and values;
- any other object by type and, recursively, its attributes (``vars()``, slots), so that configuration objects
  and ``functools.partial`` norm layers created per model (torchvision's) compare equal when their contents do.
"""

from __future__ import annotations

import enum
import functools
import math
import types
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

BOOKKEEPING = frozenset(vars(nn.Module()))
"""The ``__dict__`` entries every nn.Module has: tensors and submodules, hooks, the ``training`` flag."""

_PLAIN = (int, float, complex, str, bytes, bool, type(None))
_BY_IDENTITY = (type, types.BuiltinFunctionType, types.ModuleType, enum.Enum)


def module_state(module: nn.Module, ignore: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The configuration of ``module``: its ``__dict__`` less nn.Module's bookkeeping and the names in ``ignore``."""
    return {name: value for name, value in vars(module).items() if name not in BOOKKEEPING and name not in ignore}


class MemberIndex:
    """The parameters, buffers and modules of one member's tree, by identity: what a value that is one of them is
    called in that member."""

    def __init__(self, root: nn.Module):
        self.names: dict[int, str] = {}
        for name, tensor in root.named_parameters():
            self.names[id(tensor)] = f"parameter '{name}'"
        for name, tensor in root.named_buffers():
            self.names[id(tensor)] = f"buffer '{name}'"
        for path, module in root.named_modules():
            self.names[id(module)] = f"module '{path}'" if path else "the root module"

    def name_of(self, value: Any) -> str | None:
        return self.names.get(id(value))


@dataclass(frozen=True)
class Difference:
    """The first difference found: the attribute path (``num_heads``, ``norm_layer.keywords['eps']``), and each
    side's value described, or None where that side has no such attribute."""

    attribute: str
    ours: str | None
    theirs: str | None

    def describe(self, theirs: str = "member 0 has") -> str:
        """``has num_heads=4, member 0 has 2`` (``theirs`` names the other side, with its verb)."""
        if self.ours is None:
            return f"has no attribute {self.attribute}, {theirs} {self.attribute}={self.theirs}"
        if self.theirs is None:
            return f"has {self.attribute}={self.ours}, {theirs} no attribute {self.attribute}"
        return f"has {self.attribute}={self.ours}, {theirs} {self.theirs}"


def first_difference(module: nn.Module, other: nn.Module, index: MemberIndex, other_index: MemberIndex,
                     ignore: frozenset[str] = frozenset()) -> Difference | None:
    """The first attribute of ``module``'s configuration that differs from ``other``'s (the same path in another
    member; ``index`` and ``other_index`` index the two members' trees), or None when they agree."""
    return _Comparison(index, other_index).states(module_state(module, ignore), module_state(other, ignore), "")


class _Comparison:
    def __init__(self, ours: MemberIndex, theirs: MemberIndex):
        self.ours, self.theirs = ours, theirs
        self.open: set[tuple[int, int]] = set()  # pairs being compared: a cycle back to one of them compares equal

    def states(self, ours: dict, theirs: dict, prefix: str) -> Difference | None:
        """Two attribute dicts (``vars()`` of a module or object), reported as ``prefix + name``."""
        for name, value in theirs.items():
            where = f"{prefix}{name}"
            if name not in ours:
                return Difference(where, None, describe(value, self.theirs))
            found = self.values(ours[name], value, where)
            if found is not None:
                return found
        for name, value in ours.items():
            if name not in theirs:
                return Difference(f"{prefix}{name}", describe(value, self.ours), None)
        return None

    def differ(self, a: Any, b: Any, where: str) -> Difference:
        if type(a) is not type(b) and isinstance(a, _PLAIN) and isinstance(b, _PLAIN):
            return Difference(where, f"{describe(a, self.ours)} ({type(a).__name__})",
                              f"{describe(b, self.theirs)} ({type(b).__name__})")
        return Difference(where, describe(a, self.ours), describe(b, self.theirs))

    def values(self, a: Any, b: Any, where: str) -> Difference | None:
        if a is b:
            return None
        own_a, own_b = self.ours.name_of(a), self.theirs.name_of(b)
        if own_a is not None or own_b is not None:
            return None if own_a == own_b else self.differ(a, b, where)
        if type(a) is not type(b):
            return self.differ(a, b, where)
        if isinstance(a, float):
            return None if a == b or (math.isnan(a) and math.isnan(b)) else self.differ(a, b, where)
        if isinstance(a, _PLAIN):
            return None if a == b else self.differ(a, b, where)
        if isinstance(a, torch.Tensor):
            for attribute in ("shape", "dtype", "device"):
                if getattr(a, attribute) != getattr(b, attribute):
                    return Difference(where, _tensor_of(a, attribute), _tensor_of(b, attribute))
            return None if _same_values(a, b) else self.differ(a, b, where)
        if isinstance(a, _BY_IDENTITY):
            return self.differ(a, b, where)
        if isinstance(a, weakref.ref):
            return self.values(a(), b(), where)
        key = (id(a), id(b))
        if key in self.open:
            return None
        self.open.add(key)
        try:
            return self.containers(a, b, where)
        finally:
            self.open.discard(key)

    def containers(self, a: Any, b: Any, where: str) -> Difference | None:
        if isinstance(a, (tuple, list)):
            if len(a) != len(b):
                return self.differ(a, b, where)
            for i, (x, y) in enumerate(zip(a, b)):
                found = self.values(x, y, f"{where}[{i}]")
                if found is not None:
                    # A kernel size or stride reads better whole: (2, 2) against (1, 1).
                    plain = all(isinstance(item, _PLAIN) for item in (*a, *b))
                    return self.differ(a, b, where) if plain else found
            return None
        if isinstance(a, dict):
            if list(a) != list(b):
                return self.differ(a, b, where)
            for key in a:
                found = self.values(a[key], b[key], f"{where}[{key!r}]")
                if found is not None:
                    return found
            return None
        if isinstance(a, (set, frozenset)):
            return None if a == b else self.differ(a, b, where)
        if isinstance(a, functools.partial):
            return (self.values(a.func, b.func, f"{where}.func") or self.values(a.args, b.args, f"{where}.args")
                    or self.values(a.keywords, b.keywords, f"{where}.keywords"))
        if isinstance(a, types.FunctionType):
            return self.functions(a, b, where)
        if isinstance(a, types.MethodType):
            return self.values(a.__func__, b.__func__, where) or self.values(a.__self__, b.__self__, where)
        state_a, state_b = _attributes(a), _attributes(b)
        if state_a is None or state_b is None:
            return None if _equal(a, b) else self.differ(a, b, where)
        return self.states(state_a, state_b, f"{where}.")

    def functions(self, a: types.FunctionType, b: types.FunctionType, where: str) -> Difference | None:
        """One function made twice (a lambda or closure in ``__init__``) is the same code with the same defaults
        and closed-over values; anything else is another function."""
        if a.__code__ is not b.__code__ or a.__globals__ is not b.__globals__:
            return self.differ(a, b, where)
        found = self.values(a.__defaults__, b.__defaults__, f"{where}.__defaults__") or self.values(
            a.__kwdefaults__, b.__kwdefaults__, f"{where}.__kwdefaults__")
        if found is not None:
            return found
        for name, x, y in zip(a.__code__.co_freevars, a.__closure__ or (), b.__closure__ or ()):
            found = self.values(x.cell_contents, y.cell_contents, f"{where}.<closure {name}>")
            if found is not None:
                return found
        return None


def _tensor_of(tensor: torch.Tensor, attribute: str) -> str:
    if attribute == "shape":
        return f"a tensor of shape {tuple(tensor.shape)}"
    return f"a tensor of {attribute} {getattr(tensor, attribute)}"


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors of one shape, dtype and device hold the same values (NaN equal to NaN)."""
    if a.device.type == "meta":
        return True
    if a.is_floating_point() or a.is_complex():
        return bool(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()))
    return bool(torch.equal(a, b))


def _attributes(value: Any) -> dict | None:
    """An object's attributes (``vars()`` and slots), or None for an object that has neither."""
    state = dict(vars(value)) if hasattr(value, "__dict__") else {}
    slots = [slot for cls in type(value).__mro__ for slot in getattr(cls, "__slots__", ())
             if slot not in ("__dict__", "__weakref__")]
    for slot in slots:
        if hasattr(value, slot):
            state[slot] = getattr(value, slot)
    if not state and not hasattr(value, "__dict__") and not slots:
        return None
    return state


def _equal(a: Any, b: Any) -> bool:
    try:
        result = a == b
    except Exception:  # an object whose comparison raises is equal only to itself
        return False
    return result if isinstance(result, bool) else False


def describe(value: Any, index: MemberIndex | None = None) -> str:
    """A short description of a configuration value for an error message."""
    own = index.name_of(value) if index is not None else None
    if own is not None:
        return own
    if isinstance(value, torch.Tensor):
        if value.numel() <= 8 and value.device.type != "meta":
            return repr(value.detach()).replace("\n", "")
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType)):
        name = value.__qualname__ if isinstance(value, types.FunctionType) else value.__name__
        return f"{value.__module__}.{name}" if getattr(value, "__module__", None) else name
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    text = repr(value)
    if " at 0x" in text or (isinstance(value, nn.Module) and "\n" in text):
        return f"a {type(value).__qualname__}"
    return text if len(text) <= 80 else text[:77] + "..."
