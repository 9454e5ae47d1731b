"""Hooks registered on the modules of a fused network (``fused.stacked.layer4.register_forward_hook``).

The fused graph runs a layer as one op over every member's activations, in whichever layout suits it (fusion/layout.py),
without calling the module, and torch.fx inlines containers (``nn.Sequential``, a ResNet block) into their layers'
calls, so nn.Module would never run their hooks. The graph runner calls them itself, once per forward, with
member-first tensors ``[N, B, ...]`` (a shared input expanded, not copied): the N members' hooks' views, stacked.

- Layers (modules the graph calls): forward hooks and pre-hooks, ``with_kwargs`` too, around the layer's fused
  step. A hook's return value replaces the layer's output, or its input when the layer takes one tensor, as in
  nn.Module, and must be member-first too.
- Containers: when their traced code is one run of the graph with one input and one output (a Sequential, a
  residual block), forward hooks run after their last op and may replace the output; pre-hooks run before their
  first op and may only observe (a new input would also reach the input's other readers, such as a skip
  connection). Their input is then kept until the hooks ran, which only a forward with such hooks pays for.
- Anywhere else (the stacked root, a container called twice or with several inputs, the inner layers of a layer
  that runs whole such as a TransformerEncoder's), and for backward hooks on any module, a forward raises instead
  of silently skipping the hook (for gradients, call ``register_hook`` on the output in a forward hook).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fused_ensemble.fusion.layout import Layout, to_member_tree


@dataclass(frozen=True)
class ContainerSpan:
    """A container whose traced code is the graph's slots ``start..end``, reading slot ``input`` from outside and
    returning the value in slot ``output``."""
    path: str
    module: nn.Module
    start: int
    end: int
    input: int
    output: int


def container_spans(graph: fx.Graph, stacked: nn.Module, index: dict
                    ) -> tuple[list[ContainerSpan], list[tuple[str, nn.Module]]]:
    """The modules of ``stacked`` that the graph does not call: the containers whose hooks can run, and the rest
    as (path, module). ``index`` maps a node to its slot."""
    called = {node.target for node in graph.nodes if node.op == "call_module"}
    nodes_of: dict[str, list[fx.Node]] = defaultdict(list)  # module path -> the nodes its forward made, in order
    for node in graph.nodes:
        for path in {entry[0] for entry in node.meta.get("nn_module_stack", {}).values()}:
            nodes_of[path].append(node)
    spans, others = [], []
    for path, module in stacked.named_modules():
        if path in called:
            continue
        span = _span(path, module, nodes_of.get(path, []), index) if path else None
        if span is None:
            others.append((path, module))
        else:
            spans.append(span)
    return spans, others


def _span(path: str, module: nn.Module, inside: list[fx.Node], index: dict) -> ContainerSpan | None:
    if not inside:
        return None
    start, end = index[inside[0]], index[inside[-1]]
    if end - start + 1 != len(inside):
        return None  # called twice, or its ops interleaved with others
    members = set(inside)
    inputs = {used for node in inside for used in node.all_input_nodes
              if used not in members and used.op != "get_attr"}  # a parameter read is not an input
    outputs = [node for node in inside if any(user not in members for user in node.users)]
    if len(inputs) != 1 or len(outputs) != 1:
        return None
    return ContainerSpan(path, module, start, end, index[inputs.pop()], index[outputs[0]])


def run_container_pre_hooks(span: ContainerSpan, env: list, n: int) -> None:
    """``span``'s pre-hooks, before its first op: they observe its member-first input."""
    _refuse_backward_hooks(span.module, span.path)
    _, _, changed = _run_pre_hooks(span.module, (to_member_tree(*env[span.input], n),), {})
    if changed:
        raise TypeError(f"a forward pre-hook on '{span.path}' ({type(span.module).__name__}) returned new inputs: "
                        f"torch.fx inlined this container, so its input is also what other ops read; register the "
                        f"pre-hook on its first layer instead")


def run_container_hooks(span: ContainerSpan, env: list, n: int) -> tuple[Any, Layout]:
    """``span``'s forward hooks, after its last op: the (value, layout) its output slot then holds."""
    return _run_forward_hooks(span.module, (to_member_tree(*env[span.input], n),), {},
                              to_member_tree(*env[span.output], n)), Layout.MEMBER


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward, forward-pre or backward hooks of its own."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def refuse_hooks_on(modules: list[tuple[str, nn.Module]], why: str) -> None:
    """Raises a TypeError naming the first of ``modules`` (path, module) with hooks, saying ``why`` they cannot
    run."""
    for path, module in modules:
        if has_hooks(module):
            name = _named(path)
            raise TypeError(f"a hook is registered on {name} ({type(module).__name__}) of a FusedEnsemble: {why}")


UNHOOKABLE = ("the fused graph cannot run it (not one layer, nor a container whose traced ops take one input and "
              "give one output; see fused_ensemble.fusion.hooks); register it on a layer or container inside, or on "
              "the FusedEnsemble itself")


def run_hooked(module: nn.Module, path: str, step: Callable, env: list, refs, resolve: Callable, n: int):
    """``step(env)`` (the layer's fused step, returning ``(value, layout)``) with ``module``'s hooks around it."""
    _refuse_backward_hooks(module, path)
    (values, keywords), layouts = resolve(env, refs)
    args, kwargs = to_member_tree((values, keywords), layouts, n)
    args, kwargs, changed = _run_pre_hooks(module, tuple(args), kwargs)
    if changed:
        env = _with_new_input(env, refs, args, kwargs, path)
    with _hooks_set_aside(module):  # a layer run as a module (the generic paths) must not fire them again
        value, layout = step(env)
    return _run_forward_hooks(module, args, kwargs, to_member_tree(value, layout, n)), Layout.MEMBER


def _named(path: str) -> str:
    """A module of the stacked tree in an error message (the root of a single-layer member has the path "")."""
    return f"'{path}'" if path else "the stacked root module"


def _refuse_backward_hooks(module: nn.Module, path: str) -> None:
    if module._backward_hooks or module._backward_pre_hooks:
        raise TypeError(f"a backward hook is registered on {_named(path)} ({type(module).__name__}) of a "
                        f"FusedEnsemble, whose fused modules never run as modules; register a forward hook that "
                        f"calls register_hook on the member-first output instead")


def _run_forward_hooks(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """nn.Module's forward-hook protocol: each hook may return a replacement output. The network goes on with the
    member-first output the hooks saw (a view of the fused value, so a gradient hook registered on it fires)."""
    for hook_id, hook in list(module._forward_hooks.items()):
        if hook_id in module._forward_hooks_with_kwargs:
            result = hook(module, args, kwargs, output)
        else:
            result = hook(module, args, output)
        if result is not None:
            output = result
    return output


def _run_pre_hooks(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict, bool]:
    """nn.Module's pre-hook protocol: a hook returns None, new positional inputs (a tuple or one value), or with
    ``with_kwargs=True`` an ``(args, kwargs)`` pair."""
    changed = False
    for hook_id, hook in list(module._forward_pre_hooks.items()):
        if hook_id in module._forward_pre_hooks_with_kwargs:
            result = hook(module, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(f"forward pre-hook must return None or a tuple of (new_args, new_kwargs), "
                                       f"but got {result}.")
                args, kwargs, changed = result[0], result[1], True
        else:
            result = hook(module, args)
            if result is not None:
                args, changed = (result if isinstance(result, tuple) else (result,)), True
    return args, kwargs, changed


def _with_new_input(env: list, refs, args: tuple, kwargs: dict, path: str) -> list:
    """A copy of ``env`` in which the layer's one input (a graph value) is ``args[0]``, member-first."""
    ref_args, ref_kwargs = refs
    # (a graph value is a reference to a slot of the graph: it has the slot's index)
    single_value = len(ref_args) == 1 and not ref_kwargs and hasattr(ref_args[0], "index")
    if not single_value or len(args) != 1 or kwargs:
        raise TypeError(f"a forward pre-hook on {_named(path)} changed its inputs: the fused network takes new inputs "
                        f"only for layers called with one tensor (and returned as one)")
    if not isinstance(args[0], torch.Tensor):
        raise TypeError(f"a forward pre-hook on {_named(path)} returned a {type(args[0]).__name__}, not a tensor")
    env = list(env)
    env[ref_args[0].index] = (args[0], Layout.MEMBER)
    return env


@contextlib.contextmanager
def _hooks_set_aside(module: nn.Module):
    saved = module._forward_hooks, module._forward_pre_hooks
    module._forward_hooks, module._forward_pre_hooks = OrderedDict(), OrderedDict()
    try:
        yield
    finally:
        module._forward_hooks, module._forward_pre_hooks = saved
