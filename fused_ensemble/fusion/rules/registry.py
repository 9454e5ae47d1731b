"""The one rule interface and the one registry of the layer kinds that run fused.

A rule says how one kind of layer runs for all N members at once. It is given the stacked layer (every parameter
and buffer has the member index in dim 0), the call (``LayerCall``: the inputs, and the ``Layout`` of each tensor
among them) and the ``FusionContext`` of this forward, and returns the output with its layout, or None for a call
it leaves to the graph runner's generic paths (``vmap`` over the stacked parameters). Rules are registered per
layer type; a layer gets the rule of the most specific registered class of its type (``rule_for``).

Most layers are called with one tensor: ``@layer_rule(nn.Conv2d, ...)`` registers a function
``(module, x, layout, ctx) -> (y, layout)`` as a ``OneInputRule``. Layers called with several inputs and keywords
(attention, transformer layers, recurrent layers) subclass ``Rule``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fused_ensemble.fusion.layout import Layout

LayerOutput = tuple[Any, Layout]


@dataclass(frozen=True)
class FusionContext:
    """What a rule needs to know besides the layer and its inputs: how many members run, and the modes of this
    forward (``conv_backward``: ``"grouped"`` or ``"per_member"``, see ``fused_ensemble.config.conv_backward``)."""

    num_members: int
    conv_backward: str = "grouped"


@dataclass(frozen=True)
class LayerCall:
    """One call of a layer: positional and keyword inputs, and layouts mirroring them (a ``Layout`` for each tensor
    leaf, anything else for other leaves)."""

    args: tuple
    kwargs: dict
    layouts: tuple
    keyword_layouts: dict

    def bind(self, signature: inspect.Signature, module: nn.Module) -> tuple[dict, dict]:
        """The call's arguments by parameter name of ``signature`` (a forward's, ``self`` first; defaults filled
        in), and the layout of each argument by name."""
        bound = signature.bind(module, *self.args, **self.kwargs)
        bound.apply_defaults()
        layout_of = dict(zip(list(signature.parameters)[1:], self.layouts))
        layout_of.update(self.keyword_layouts)
        return bound.arguments, layout_of


class Rule:
    """How one kind of layer runs for all N members at once (see the module docstring)."""

    def fusable(self, module: nn.Module) -> bool:
        """Whether this rule can run ``module`` at all (its configuration); asked once, when the graph is built.
        A layer it cannot run takes the generic path."""
        return True

    def takes(self, num_args: int, keywords: list[str]) -> bool:
        """Whether this rule can run a call site with ``num_args`` positional inputs and these keywords; asked
        once per call site, when the graph is built."""
        return True

    def __call__(self, module: nn.Module, call: LayerCall, ctx: FusionContext) -> LayerOutput | None:
        raise NotImplementedError


OneInputFunction = Callable[[nn.Module, torch.Tensor, Layout, FusionContext], LayerOutput]


class OneInputRule(Rule):
    """A rule for layers called with one tensor: ``function(module, x, layout, ctx) -> (y, layout)``."""

    def __init__(self, function: OneInputFunction):
        self.function = function

    def takes(self, num_args: int, keywords: list[str]) -> bool:
        return num_args == 1 and not keywords

    def apply(self, module: nn.Module, x: torch.Tensor, layout: Layout, ctx: FusionContext) -> LayerOutput:
        """The layer on ``x`` (in ``layout``) for every member; for other rules that run such a layer inside."""
        return self.function(module, x, layout, ctx)

    def __call__(self, module: nn.Module, call: LayerCall, ctx: FusionContext) -> LayerOutput:
        return self.function(module, call.args[0], call.layouts[0], ctx)


_RULES: dict[type, Rule] = {}


def register(rule: Rule, *module_types: type) -> Rule:
    """Makes ``rule`` the rule of ``module_types`` (and of their subclasses without a rule of their own)."""
    for module_type in module_types:
        _RULES[module_type] = rule
    return rule


def layer_rule(*module_types: type) -> Callable[[OneInputFunction], OneInputFunction]:
    """Decorator: registers a one-input rule function for ``module_types`` and returns the function."""
    def decorate(function: OneInputFunction) -> OneInputFunction:
        register(OneInputRule(function), *module_types)
        return function
    return decorate


def rule_for(module: nn.Module) -> Rule | None:
    """The rule of the most specific registered class of ``module``'s type, if it can run this module."""
    for module_type in type(module).__mro__:
        if module_type in _RULES:
            rule = _RULES[module_type]
            return rule if rule.fusable(module) else None
    return None


# Layers whose weights cannot be vmapped or that keep state we do not stack: refused with a clear error.
UNSUPPORTED_MODULES = (nn.SyncBatchNorm, nn.modules.lazy.LazyModuleMixin)


def unsupported_reason(module: nn.Module) -> str | None:
    """Why ``module`` cannot be fused at all (no rule, nor the generic path, can run it), or None."""
    if isinstance(module, UNSUPPORTED_MODULES):
        return f"{type(module).__name__} layers are not supported"
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.sparse
                                             or module.scale_grad_by_freq):
        return ("nn.Embedding with max_norm (renormalizes weights in place), sparse gradients or "
                "scale_grad_by_freq is not supported")
    return None


def member_shape(x: torch.Tensor, layout: Layout, n: int) -> tuple[int, ...]:
    """The shape of one member's value of ``x`` (in ``layout``)."""
    if layout is Layout.SHARED:
        return tuple(x.shape)
    if layout is Layout.MEMBER:
        return tuple(x.shape[1:])
    return (x.shape[0], x.shape[1] // n, *x.shape[2:])


def expect_channels(x: torch.Tensor, layout: Layout, n: int, channels: int) -> None:
    """Raises a ValueError unless each member's ``x`` has ``channels`` channels (dim 1 of its ``[B, C, ...]``):
    the member's mismatch, where the fused op would report the N members' channels side by side."""
    shape = member_shape(x, layout, n)
    got = shape[1] if len(shape) > 1 else None
    if got != channels:
        raise ValueError(f"expected input with {channels} channels per member, got "
                         f"{got if got is not None else f'an input of shape {shape}'}")


def expect_batched(module: nn.Module, x: torch.Tensor, layout: Layout, batched_dims: int) -> None:
    """Raises a ValueError unless ``x`` has ``batched_dims`` dims per member (a batch dim included)."""
    member_dims = x.dim() - (1 if layout is Layout.MEMBER else 0)
    if member_dims != batched_dims:
        raise ValueError(f"{type(module).__name__} in a FusedEnsemble needs batched input with {batched_dims} dims "
                         f"per member, got {member_dims}")

