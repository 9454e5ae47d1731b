"""Runs a member's traced forward (a torch.fx graph) once for all N members.

Every value carries a ``Layout`` (see layout.py). Layers with a rule (fused_ensemble.fusion.rules) run as one fused
op (grouped convolution, batched matmul, BatchNorm over N * C channels, attention over the N * B sequences; the
recurrent layers' rule is the one that runs member by member). Everything else runs through one of three generic
paths, none of which loops over members in Python (op_kinds.py says which ops may run unchanged):

- values every member shares (no member tensor among the inputs) are computed once, as the member would;
- elementwise and per-channel ops on channel-packed or member-first tensors run unchanged;
- any other op runs under ``torch.vmap`` over the member dim (with independent randomness per member), and a
  layer with parameters but no rule runs as ``vmap(functional_call)`` over the stacked parameters.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from fused_ensemble.fusion import hooks
from fused_ensemble.fusion.layout import Layout, convert, to_member, to_member_tree
from fused_ensemble.fusion.op_kinds import (
    CHANNELWISE,
    CONCATENATE,
    ELEMENTWISE,
    RANDOM,
    RANDOM_FAST_PATH,
    function_kind,
    module_kind,
)
from fused_ensemble.fusion.rules import FusionContext, LayerCall, member_shape, rule_for, unsupported_reason

try:
    from torchvision.ops import stochastic_depth as _stochastic_depth
except ImportError:  # torchvision is optional for the runner
    _stochastic_depth = None

Step = Callable[[list, FusionContext], tuple[Any, Layout]]
# The error types a layer's step re-raises with the layer's path (exactly these: not their subclasses, such as
# torch.OutOfMemoryError, whose constructors and handlers expect their own messages).
_NAMED_ERRORS = (ValueError, TypeError, IndexError, RuntimeError, AssertionError)

_SHAPE_METHODS = {"size", "dim", "numel", "nelement", "ndimension"}
_SHAPE_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_cuda", "requires_grad", "layout"}


class _Ref:
    """Placeholder for the value of the node at ``index`` inside a node's (args, kwargs)."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


class _NotATensor:
    pass


_NOT_A_TENSOR = _NotATensor()


class FusedGraph:
    """One traced member forward, compiled into a list of steps that run all N members at once."""

    def __init__(self, graph: fx.Graph, stacked: nn.Module, num_members: int):
        self.num_members = num_members
        self.stacked = stacked
        index = {node: slot for slot, node in enumerate(graph.nodes)}  # a node's value lives in env[index[node]]
        self._steps: list[Step | None] = []
        self._placeholders: list[tuple[int, str, Any]] = []  # (slot, argument name, default)
        self._output: Any = None
        # After step i, the values whose last user it was are dropped (as torch.fx.Interpreter does): holding every
        # activation until the output made a fused ResNet-18 forward at N=8, B=64 grow the heap by 3 GB per call.
        last_user: dict[int, int] = {}
        for node in graph.nodes:
            for used in node.all_input_nodes:
                last_user[index[used]] = index[node]
        output_slot = len(index) - 1
        self._release = _release_schedule(last_user, output_slot)
        # Modules the graph never calls (containers fx inlined, the inner layers of a layer run whole): containers'
        # hooks run around their ops, and need their input kept until then; anywhere else a hook raises.
        self._containers, self._unhookable = hooks.container_spans(graph, stacked, index)
        for span in self._containers:
            last_user[span.input] = max(last_user.get(span.input, span.input), span.end)
        self._release_for_container_hooks = _release_schedule(last_user, output_slot)
        for node in graph.nodes:
            refs = fx.node.map_arg((node.args, node.kwargs), lambda n: _Ref(index[n]))
            if node.op == "placeholder":
                default = node.args[0] if node.args else _NOT_A_TENSOR
                self._placeholders.append((index[node], node.target, default))
                self._steps.append(None)
            elif node.op == "output":
                self._output = refs[0][0]
                self._steps.append(None)
            else:
                self._steps.append(self._compile(node, refs))

    # ---- building -------------------------------------------------------------------------------------------

    def _compile(self, node: fx.Node, refs) -> Step:
        args, kwargs = refs
        if node.op == "get_attr":
            stacked_names = {name for name, _ in self.stacked.named_parameters()}
            stacked_names |= {name for name, _ in self.stacked.named_buffers()}
            layout = Layout.MEMBER if node.target in stacked_names else Layout.SHARED
            atoms = node.target.split(".")

            def fetch_attribute(env, ctx):
                value = self.stacked
                for atom in atoms:
                    value = getattr(value, atom)
                return value, layout
            return fetch_attribute
        if node.op == "call_function":
            if node.target is builtins.getattr and args[1] in _SHAPE_ATTRIBUTES:
                return self._shape_query(lambda t, name: getattr(t, name), args, kwargs)
            if _stochastic_depth is not None and node.target is _stochastic_depth:
                return self._stochastic_depth(args, kwargs)
            return self._call(node.target, function_kind(node.target), args, kwargs)
        if node.op == "call_method":
            name = node.target
            method = _method_caller(name)
            if name in _SHAPE_METHODS:
                return self._shape_query(method, args, kwargs)
            return self._call(method, function_kind(name), args, kwargs)
        if node.op == "call_module":
            return self._compile_module(node, args, kwargs)
        raise NotImplementedError(f"unexpected fx node {node.op}")

    def _compile_module(self, node: fx.Node, args, kwargs) -> Step:
        """The layer's fused step, which runs the hooks registered on the layer around it (hooks.py)."""
        module = self.stacked.get_submodule(node.target)
        step = self._compile_layer(node.target, module, args, kwargs)

        def run(env, ctx):
            if hooks.has_hooks(module):
                return hooks.run_hooked(module, node.target, lambda env: step(env, ctx), env, (args, kwargs),
                                        self._resolve, self.num_members)
            return step(env, ctx)
        return run

    def _compile_layer(self, path: str, module: nn.Module, args, kwargs) -> Step:
        where = f"layer '{path}' ({type(module).__name__})" if path else f"the member layer ({type(module).__name__})"
        return self._naming_the_layer(where, self._layer_step(where, module, args, kwargs), args, kwargs)

    def _naming_the_layer(self, where: str, step: Step, args, kwargs) -> Step:
        """``step`` whose errors name the layer, as the member would meet it: the rules check shapes per member
        (channels, features), and torch's own errors from a fused op or vmap get the members' input shapes."""
        def run(env, ctx):
            try:
                return step(env, ctx)
            except _NAMED_ERRORS as error:
                if type(error) not in _NAMED_ERRORS or where in str(error):
                    raise  # (OutOfMemoryError, NotImplementedError, ...) as they are; or named already
                detail = ""
                if type(error) in (RuntimeError, AssertionError):
                    detail = f" on member inputs of shape {self._member_shapes(env, (args, kwargs))}"
                raise type(error)(f"{where}{detail}: {error}") from error
        return run

    def _member_shapes(self, env, refs) -> list[tuple[int, ...]]:
        (values, keywords), (layouts, keyword_layouts) = self._resolve(env, refs)
        leaves, _ = tree_flatten((values, keywords))
        leaf_layouts, _ = tree_flatten((layouts, keyword_layouts))
        return [member_shape(leaf, layout, self.num_members) for leaf, layout in zip(leaves, leaf_layouts)
                if isinstance(leaf, torch.Tensor) and isinstance(layout, Layout)]

    def _layer_step(self, where: str, module: nn.Module, args, kwargs) -> Step:
        reason = unsupported_reason(module)
        if reason is not None:
            raise TypeError(f"cannot fuse {where}: {reason}")
        has_parameters = any(True for _ in module.parameters())
        has_buffers = any(True for _ in module.buffers())
        rule = rule_for(module)
        if rule is not None and not rule.takes(len(args), list(kwargs)):
            if has_buffers:  # state the generic path could not keep per member
                raise TypeError(f"cannot fuse {where}: expected one positional input, got {len(args)} and keyword "
                                f"arguments {sorted(kwargs)}")
            rule = None  # a call the rule does not take (ConvTranspose's output_size): the generic path
        if rule is None:
            return self._generic_layer(where, module, args, kwargs, has_parameters, has_buffers)
        # The generic path runs the calls a rule leaves to it (it returns None); layers with state have none.
        generic = None if has_buffers else self._generic_layer(where, module, args, kwargs, has_parameters, False)
        one_input = len(args) == 1 and not kwargs and isinstance(args[0], _Ref)

        def run_rule(env, ctx):
            if one_input:  # the common case, without the argument-structure walk
                value, layout = env[args[0].index]
                call = LayerCall((value,), {}, (layout,), {})
            else:
                (values, keywords), (layouts, keyword_layouts) = self._resolve(env, (args, kwargs))
                call = LayerCall(tuple(values), keywords, tuple(layouts), keyword_layouts)
            output = rule(module, call, ctx)
            if output is not None:
                return output
            if generic is None:
                raise TypeError(f"cannot fuse {where}: its rule cannot run this call and the layer keeps buffers "
                                f"(state) that the generic path cannot update per member")
            return generic(env, ctx)
        return run_rule

    def _generic_layer(self, where: str, module: nn.Module, args, kwargs, has_parameters: bool,
                       has_buffers: bool) -> Step:
        """A layer without a rule: run as it is (parameterless layers) or under vmap over its stacked parameters."""
        if has_buffers:
            raise TypeError(f"cannot fuse {where}: it keeps buffers (state) and FusedEnsemble has no rule for this "
                            f"layer type")
        if not has_parameters:
            return self._call(module, module_kind(module), args, kwargs)
        return self._vmapped_module(module, args, kwargs)

    def _vmapped_module(self, module: nn.Module, args, kwargs) -> Step:
        """A layer with parameters and no rule: its functional form under vmap over the stacked parameters."""
        names = [name for name, _ in module.named_parameters()]

        def functional(*inputs, **keywords):
            params = dict(zip(names, inputs[:len(names)]))
            return torch.func.functional_call(module, params, inputs[len(names):], keywords)

        param_refs = tuple(_Param(module, name) for name in names)
        return self._call(_without_inference_fast_paths(functional), None, param_refs + tuple(args), kwargs)

    # ---- running --------------------------------------------------------------------------------------------

    def _resolve(self, env, refs):
        """(values, layouts) for a node's argument structure; layouts mirror values leaf for leaf."""
        values = _map_plain(refs, lambda a: _resolve_leaf(a, env))
        layouts = _map_plain(refs, lambda a: _layout_leaf(a, env))
        return values, layouts

    def _shape_query(self, query, args, kwargs):
        def run(env, ctx):
            (tensor, *rest), keywords = self._resolve(env, (args, kwargs))[0]
            value, layout = env[args[0].index]
            if layout is not Layout.SHARED and isinstance(value, torch.Tensor):
                tensor = to_member(value, layout, self.num_members)[0]
            return query(tensor, *rest, **keywords), Layout.SHARED
        return run

    def _call(self, function, category, args, kwargs):
        n = self.num_members

        def run(env, ctx):
            (values, keywords), (layouts, keyword_layouts) = self._resolve(env, (args, kwargs))
            leaves, spec = tree_flatten((values, keywords))
            leaf_layouts, _ = tree_flatten((layouts, keyword_layouts))
            tensor_layouts = {lay for lay in leaf_layouts if isinstance(lay, Layout)}
            if tensor_layouts <= {Layout.SHARED}:
                if category is RANDOM and _random_call_is_live(values, keywords):
                    leaf_layouts = _expand_first_tensor(leaves, leaf_layouts, n)
                else:
                    return function(*values, **keywords), Layout.SHARED
            else:
                if category is CONCATENATE:
                    fused = _concatenate_channel_packed(values, keywords, leaf_layouts, n)
                    if fused is not None:
                        return fused, Layout.CHANNEL
                fast_category = RANDOM_FAST_PATH.get(function) if category is RANDOM else category
                fast = _same_layout_fast_path(fast_category, leaves, leaf_layouts)
                if fast is not None:
                    return function(*values, **keywords), fast
                if fast_category is CHANNELWISE and _is_single_member_first_tensor(values, leaf_layouts):
                    # Pooling has no batching rule for every memory format (vmap would fall back to a loop):
                    # channel-pack the input instead, one copy.
                    packed = convert(values[0], Layout.MEMBER, Layout.CHANNEL, n)
                    return function(packed, *values[1:], **keywords), Layout.CHANNEL
            in_dims = []
            for i, (leaf, layout) in enumerate(zip(leaves, leaf_layouts)):
                if isinstance(layout, Layout) and layout is not Layout.SHARED:
                    leaves[i] = convert(leaf, layout, Layout.MEMBER, n)
                    in_dims.append(0)
                else:
                    in_dims.append(None)

            # vmap returns tensors only: non-tensor outputs (None from MultiheadAttention(need_weights=False),
            # ints) are the same for every member, so they are kept from the one traced call and put back.
            output_structure = {}

            def call_one_member(*member_leaves):
                member_args, member_kwargs = tree_unflatten(list(member_leaves), spec)
                out_leaves, out_spec = tree_flatten(function(*member_args, **member_kwargs))
                output_structure["spec"] = out_spec
                output_structure["leaves"] = out_leaves
                return tuple(leaf for leaf in out_leaves if isinstance(leaf, torch.Tensor))

            tensors = iter(torch.vmap(call_one_member, in_dims=tuple(in_dims), randomness="different")(*leaves))
            out_leaves = [next(tensors) if isinstance(leaf, torch.Tensor) else leaf
                          for leaf in output_structure["leaves"]]
            return tree_unflatten(out_leaves, output_structure["spec"]), Layout.MEMBER
        return run

    def _stochastic_depth(self, args, kwargs):
        """torchvision's stochastic depth: each member drops its own rows (mode "row") or batches ("batch")."""
        n = self.num_members

        def run(env, ctx):
            (values, keywords), _ = self._resolve(env, (args, kwargs))
            bound = dict(zip(("input", "p", "mode", "training"), values), **keywords)
            x, layout = env[args[0].index]
            p, mode, training = bound["p"], bound["mode"], bound.get("training", True)
            if not training or p == 0.0:
                return x, layout
            if layout is Layout.SHARED and p == 1.0:
                return x * 0.0, layout
            x = to_member(x, layout, n)
            survival = 1.0 - p
            shape = [n, x.shape[1]] if mode == "row" else [n, 1]
            noise = torch.empty(shape + [1] * (x.dim() - 2), dtype=x.dtype, device=x.device)
            noise.bernoulli_(survival)
            if survival > 0.0:
                noise.div_(survival)
            return x * noise, Layout.MEMBER
        return run

    def run(self, inputs: list[tuple[Any, Layout]], keywords: dict[str, tuple[Any, Layout]] | None = None,
            context: FusionContext | None = None):
        """Runs the graph on (value, layout) inputs, positional and by argument name, with the modes of ``context``
        (default: none); returns the output with every tensor member-first."""
        ctx = context or FusionContext(self.num_members)
        hooks.refuse_hooks_on(self._unhookable, hooks.UNHOOKABLE)
        hooked = [span for span in self._containers if hooks.has_hooks(span.module)]
        release = self._release_for_container_hooks if hooked else self._release
        env: list = [None] * len(self._steps)
        keywords = dict(keywords or {})
        if len(inputs) > len(self._placeholders):
            raise TypeError(f"the member forward takes {len(self._placeholders)} inputs, got {len(inputs)}")
        for position, (slot, name, default) in enumerate(self._placeholders):
            if position < len(inputs):
                if name in keywords:
                    raise TypeError(f"the member forward got multiple values for argument '{name}'")
                env[slot] = inputs[position]
            elif name in keywords:
                env[slot] = keywords.pop(name)
            elif default is not _NOT_A_TENSOR:
                env[slot] = (default, Layout.SHARED)
            else:
                raise TypeError(f"the member forward takes {len(self._placeholders)} inputs, got {len(inputs)}; "
                                f"'{name}' is missing")
        if keywords:
            raise TypeError(f"the member forward got unexpected keyword arguments {sorted(keywords)}")
        starts, ends = _container_hook_slots(hooked)
        for slot, step in enumerate(self._steps):
            for span in starts.get(slot, ()):
                hooks.run_container_pre_hooks(span, env, self.num_members)
            if step is not None:
                env[slot] = step(env, ctx)
            for span in ends.get(slot, ()):
                env[span.output] = hooks.run_container_hooks(span, env, self.num_members)
            for released in release[slot]:
                env[released] = None
        return to_member_tree(*self._resolve(env, self._output), self.num_members)


def _release_schedule(last_user: dict[int, int], output_slot: int) -> list[tuple[int, ...]]:
    """For each slot, the values to drop after its step: those whose last reader it is (a value nobody reads goes
    right after it is made; values the output reads stay)."""
    release: list[tuple[int, ...]] = [() for _ in range(output_slot + 1)]
    for slot in range(output_slot):
        user = last_user.get(slot, slot)
        if user != output_slot:
            release[user] += (slot,)
    return release


def _container_hook_slots(spans) -> tuple[dict, dict]:
    """The containers with hooks by first slot (outer first, as their pre-hooks would run) and by last slot (inner
    first, as their forward hooks would)."""
    starts: dict[int, list] = {}
    ends: dict[int, list] = {}
    for span in sorted(spans, key=lambda span: len(span.path)):
        starts.setdefault(span.start, []).append(span)
        ends.setdefault(span.end, []).insert(0, span)
    return starts, ends


class _Param:
    """Argument placeholder for a stacked parameter of a module run through vmap(functional_call)."""

    __slots__ = ("module", "name")

    def __init__(self, module: nn.Module, name: str):
        self.module = module
        self.name = name


def _map_plain(a, fn):
    """``fn`` over the leaves of an argument structure, as ``fx.node.map_aggregate`` but rebuilding plain lists and
    dicts: fx's immutable_list reaching an op under vmap inside torch.compile broke the graph (torch.cat of a
    ViT's class token and patches)."""
    if isinstance(a, tuple):
        mapped = [_map_plain(x, fn) for x in a]
        return type(a)(*mapped) if hasattr(a, "_fields") else tuple(mapped)
    if isinstance(a, list):
        return [_map_plain(x, fn) for x in a]
    if isinstance(a, dict):
        return {k: _map_plain(v, fn) for k, v in a.items()}
    if isinstance(a, slice):
        return slice(_map_plain(a.start, fn), _map_plain(a.stop, fn), _map_plain(a.step, fn))
    return fn(a)


def _resolve_leaf(a, env):
    if isinstance(a, _Ref):
        return env[a.index][0]
    if isinstance(a, _Param):
        return a.module.get_parameter(a.name)
    return a


def _layout_leaf(a, env):
    if isinstance(a, _Ref):
        value, layout = env[a.index]
        return tree_map(lambda v: layout if isinstance(v, torch.Tensor) else _NOT_A_TENSOR, value)
    if isinstance(a, _Param):
        return Layout.MEMBER
    return tree_map(lambda v: Layout.SHARED if isinstance(v, torch.Tensor) else _NOT_A_TENSOR, a)


def _method_caller(name: str):
    def call_method(self, *args, **kwargs):
        return getattr(self, name)(*args, **kwargs)
    call_method.__name__ = name
    return call_method


def _random_call_is_live(values, keywords) -> bool:
    """False for a dropout called with training=False (then it is the identity and needs no per-member draw)."""
    training = keywords.get("training", values[2] if len(values) > 2 else True)
    return bool(training) if isinstance(training, bool) else True


def _expand_first_tensor(leaves, leaf_layouts, n):
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            leaf_layouts = list(leaf_layouts)
            leaf_layouts[i] = Layout.MEMBER
            leaves[i] = leaf.unsqueeze(0).expand(n, *leaf.shape)
            return leaf_layouts
    return leaf_layouts


def _same_layout_fast_path(category, leaves, leaf_layouts) -> Layout | None:
    """The layout an op can run in unchanged, or None when it needs vmap.

    Elementwise ops run unchanged when every tensor operand has the same non-shared layout, ndim and member/channel
    size (scalars and 0-dim shared tensors broadcast fine). Channelwise ops run unchanged on one channel-packed
    tensor.
    """
    tensors = [(leaf, lay) for leaf, lay in zip(leaves, leaf_layouts) if isinstance(lay, Layout)]
    packed = [(t, lay) for t, lay in tensors if not (lay is Layout.SHARED and t.dim() == 0)]
    if not packed:
        return None
    layout = packed[0][1]
    if layout is Layout.SHARED or any(lay is not layout for _, lay in packed):
        return None
    if category is ELEMENTWISE:
        ndim, size = packed[0][0].dim(), packed[0][0].shape[:2]
        key_dim = 1 if layout is Layout.CHANNEL else 0
        if all(t.dim() == ndim and t.shape[key_dim] == size[key_dim] for t, _ in packed):
            return layout
        return None
    if category is CHANNELWISE and layout is Layout.CHANNEL and len(packed) == 1:
        return layout
    return None


def _is_single_member_first_tensor(values, leaf_layouts) -> bool:
    tensor_layouts = [lay for lay in leaf_layouts if isinstance(lay, Layout)]
    return (len(tensor_layouts) == 1 and tensor_layouts[0] is Layout.MEMBER and bool(values)
            and isinstance(values[0], torch.Tensor) and values[0].dim() >= 4)


def _concatenate_channel_packed(values, keywords, leaf_layouts, n) -> torch.Tensor | None:
    """``torch.cat`` of channel-packed tensors (DenseNet, SqueezeNet): along the channel dim each member's
    channels must stay together, so cat the [B, N, C_i, ...] views along C; along any other dim it is a plain cat.
    Returns None when the operands are not all channel-packed."""
    tensors = values[0] if values else keywords.get("tensors")
    dim = values[1] if len(values) > 1 else keywords.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or not tensors:
        return None
    if any(lay is not Layout.CHANNEL for lay in leaf_layouts if isinstance(lay, Layout)):
        return None
    ndim = tensors[0].dim()
    if any(t.dim() != ndim for t in tensors) or ndim < 2:
        return None
    dim = dim % ndim
    if dim != 1:
        return torch.cat(tensors, dim)
    views = [t.unflatten(1, (n, t.shape[1] // n)) for t in tensors]
    return torch.cat(views, 2).flatten(1, 2)


def _without_inference_fast_paths(function):
    """``function`` with nn.MultiheadAttention's inference fast path off: under vmap the stacked parameters look
    like they need no gradient, and the fast path (``_native_multi_head_attention``) has no derivative."""
    set_fastpath = getattr(torch.backends.mha, "set_fastpath_enabled", None)
    if set_fastpath is None:
        return function

    def call(*args, **kwargs):
        was_enabled = torch.backends.mha.get_fastpath_enabled()
        set_fastpath(False)
        try:
            return function(*args, **kwargs)
        finally:
            set_fastpath(was_enabled)
    return call
