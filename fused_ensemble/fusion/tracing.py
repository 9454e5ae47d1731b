"""The member forward as a torch.fx graph, one per mode and call shape.

torch.fx runs the forward on proxies, and a proxy is never None: traced once, a forward that tests an input for None
(``y if w is None else (y, w)``, ``if mask is not None: ...``) would take the branch of a given input even when
called without it, and return ``(y, None)`` where the member returns ``y``. So the inputs that are None in a call
(passed as None, or left out with a default of None) are traced as None, and there is one graph per such call shape
(``call_key``); the fused module traces each shape on its first call.

torch.fx keeps the torch.nn layers whole. A member that is itself one (a bare ``Linear``, ``BatchNorm1d``, ``GRU``,
``MultiheadAttention``, ...) is not traced: its graph calls the member as one layer (a ``call_module`` node with
target ``""``, placeholders named after the layer's forward), for the positional count and keyword names of the
call, so that it runs as the same layer inside ``nn.Sequential`` would: through its rule, the generic paths and the
hooks registered on the stacked root.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch.fx as fx
from torch import nn

ForwardParameters = tuple[tuple[str, bool, bool], ...]
"""(name, required, default is None) of each named parameter of a forward, positional ones first."""

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def member_is_layer(stacked: nn.Module) -> bool:
    """Whether torch.fx keeps the member whole (a torch.nn layer) instead of tracing into its forward."""
    return fx.Tracer().is_leaf_module(stacked, "")


def forward_parameters(stacked: nn.Module) -> ForwardParameters:
    """The named parameters of the member forward (see ``ForwardParameters``)."""
    parameters = [p for p in inspect.signature(stacked.forward).parameters.values()
                  if p.kind in _POSITIONAL or p.kind is inspect.Parameter.KEYWORD_ONLY]
    return tuple((p.name, p.default is inspect.Parameter.empty, p.default is None) for p in parameters)


def call_key(is_layer: bool, parameters: ForwardParameters, inputs: Sequence, keywords: dict) -> tuple:
    """What the graph of a call depends on: for a layer member, the number of positional inputs and the keyword
    names; for a traced member, which named inputs are None."""
    if is_layer:
        return (len(inputs), tuple(sorted(keywords)))
    nones = []
    for position, (name, _, default_is_none) in enumerate(parameters):
        if position < len(inputs):
            is_none = inputs[position] is None
        elif name in keywords:
            is_none = keywords[name] is None
        else:
            is_none = default_is_none
        if is_none:
            nones.append(name)
    return tuple(nones)


def default_call_key(is_layer: bool, parameters: ForwardParameters) -> tuple:
    """The key of a call with the forward's required inputs only, none of them None."""
    required = [object() for _, is_required, _ in parameters if is_required]
    return call_key(is_layer, parameters, required, {})


def trace_member(stacked: nn.Module, training: bool, key: tuple | None = None) -> fx.Graph:
    """The forward of ``stacked`` (a member's module tree) in one mode (code that reads ``self.training`` is
    specialized per mode) for the call shape ``key`` (``call_key``; default: the required inputs only). Raises a
    TypeError saying what torch.fx could not trace, or that the layer cannot take such a call."""
    is_layer = member_is_layer(stacked)
    if key is None:
        key = default_call_key(is_layer, forward_parameters(stacked))
    if is_layer:
        return _layer_graph(stacked, *key)
    was_training = stacked.training
    stacked.train(training)
    try:
        graph = fx.Tracer().trace(stacked, concrete_args={name: None for name in key} or None)
    except Exception as error:
        raise TypeError(
            f"cannot fuse {type(stacked).__qualname__}: torch.fx could not trace its forward "
            f"({type(error).__name__}: {error}). FusedEnsemble needs a forward whose Python control flow does not "
            f"depend on tensor values (if/for over tensors, .item(), data-dependent shapes).") from error
    finally:
        stacked.train(was_training)
    # torch.fx names the placeholder of an input traced as a value "<name>_1": inputs are bound by their names.
    renamed = {f"{name}_1": name for name in key}
    for node in graph.nodes:
        if node.op == "placeholder" and node.target in renamed:
            node.target = renamed[node.target]
    return graph


def _layer_graph(layer: nn.Module, positional: int, keywords: tuple[str, ...]) -> fx.Graph:
    """A graph that calls ``layer`` (the stacked root) as one layer with ``positional`` inputs and ``keywords``."""
    signature = inspect.signature(layer.forward)
    try:
        signature.bind(*range(positional), **dict.fromkeys(keywords))
    except TypeError as error:
        raise TypeError(f"the member ({type(layer).__name__}) cannot be called with {positional} positional inputs "
                        f"and keywords {list(keywords)}: {error}") from None
    names = [p.name for p in signature.parameters.values() if p.kind in _POSITIONAL]
    varargs = next((p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_POSITIONAL),
                   "input")
    graph = fx.Graph()
    args: list[Any] = [graph.placeholder(names[i] if i < len(names) else f"{varargs}_{i}") for i in range(positional)]
    kwargs = {name: graph.placeholder(name) for name in keywords}
    graph.output(graph.call_module("", tuple(args), kwargs))
    return graph
