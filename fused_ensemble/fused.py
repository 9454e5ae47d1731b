"""FusedEnsemble: N member networks of one architecture run as one network."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from fused_ensemble import config, cpu_memory
from fused_ensemble.fusion.graph_runner import FusedGraph
from fused_ensemble.fusion.inputs import with_layouts
from fused_ensemble.fusion.rules import FusionContext
from fused_ensemble.fusion.stacking import (
    check_members,
    check_replacement,
    member_index,
    stack_members,
    unstack_member,
    with_member_memory_format,
)
from fused_ensemble.fusion.tracing import (
    call_key,
    default_call_key,
    forward_parameters,
    member_is_layer,
    trace_member,
)
from fused_ensemble.ops.ensemble_reduce import reduce_members
from fused_ensemble.ops.reductions import check_reduction

if TYPE_CHECKING:
    from fused_ensemble.inference.optimized import OptimizedEnsemble


class FusedEnsemble(nn.Module):
    """N networks of one architecture (different weights) run as one network.

    The members' forward is traced with torch.fx and rewritten layer by layer: convolutions become one
    grouped convolution over all members' channels (the first layer, fed the shared input, one dense convolution
    with N * C_out outputs), linear layers one batched matmul, BatchNorm/GroupNorm one normalization over N * C
    channels with per-member statistics, dropout draws independent masks per member, and every other op runs
    once for all members (see ``fused_ensemble.fusion``). There is no per-member Python loop in the forward pass.

    Args:
        members: N ``nn.Module`` of the same class with parameters and buffers of equal names, shapes, dtypes and
            devices, the same configuration (every module's non-tensor state) and mode, and no hooks; a member may
            be a single ``torch.nn`` layer. They are copied: later changes to them do not reach the fused module.
        reduction: how the member outputs ``[N, B, ...]`` are combined: ``"none"`` (return them),
            ``"mean"`` (any output, regression too), ``"mean_probs"`` (mean of member softmaxes, the deep-ensemble
            default), ``"softmax_of_mean"``, ``"log_mean_probs"`` or ``"vote"`` (hard voting: the one-hot of the most
            frequent member argmax); the last four treat the last dim as classes. Every reduction is
            ``ensemble_reduce``'s: accumulated in float32 and returned as float32 (float64 for float64 models),
            whatever the members' output dtype.
        member_inputs: if False every member sees the same input ``[B, ...]``; if True the input is
            ``[N, B, ...]`` and member i sees ``x[i]`` (bagging, members trained on different batches), except for
            inputs wrapped in ``fused_ensemble.shared(...)``, which every member sees whole.

    On CPU, ``fused_ensemble.cpu_memory.retain_freed_cpu_memory()`` (or ``FUSED_ENSEMBLE_KEEP_CPU_MEMORY=1``) makes
    glibc keep freed memory for reuse, which can speed up large fused forwards that otherwise page-fault fresh memory
    in on every call; it is off by default (see ``fused_ensemble.cpu_memory``).

    Every parameter and buffer of the fused module is the stack of the members' tensors (dim 0 is the member
    index), under the member's own name prefixed with ``stacked.``; ``to_members()`` splits them back.
    """

    def __init__(self, members: Iterable[nn.Module], reduction: str = "mean_probs", member_inputs: bool = False):
        super().__init__()
        if reduction != "none":
            check_reduction(reduction)
        if not isinstance(member_inputs, bool):
            raise TypeError(f"member_inputs must be a bool, got {type(member_inputs).__name__}")
        members = check_members(members)
        self.num_members = len(members)
        self.reduction = reduction
        self.member_inputs = member_inputs
        self.stacked = stack_members(members)
        self._member_is_layer = member_is_layer(self.stacked)
        self._forward_parameters = forward_parameters(self.stacked)
        self._graphs = self._compile_graphs()
        self.train(members[0].training)

    def _compile_graphs(self) -> dict[tuple, FusedGraph]:
        """The fused forward of each mode (train/eval) for a call with the member forward's required inputs:
        closures over ``self.stacked``'s submodules. Other call shapes are compiled on their first call
        (``_graph_for``)."""
        key = default_call_key(self._member_is_layer, self._forward_parameters)
        return {(mode, key): self._compile(mode, key) for mode in (True, False)}

    def _compile(self, mode: bool, key: tuple) -> FusedGraph:
        return FusedGraph(trace_member(self.stacked, mode, key), self.stacked, self.num_members)

    def _graph_for(self, inputs: list, keyword_inputs: dict) -> FusedGraph:
        """The fused forward of this mode for the call shape of these inputs (see fusion/tracing.py)."""
        key = (self.training, call_key(self._member_is_layer, self._forward_parameters, inputs, keyword_inputs))
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._compile(*key)
        return graph

    # A copy (copy.deepcopy, AveragedModel's EMA copy, torch.save of the whole module) must compile graphs of its
    # own: deepcopy shares functions, so the copied graphs' closures would keep running the original's weights, and
    # pickle cannot store closures at all.
    def __getstate__(self):
        state = dict(super().__getstate__())
        del state["_graphs"]
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        # (Derived from the stacked tree again: a module pickled by an older version has neither.)
        self._member_is_layer = member_is_layer(self.stacked)
        self._forward_parameters = forward_parameters(self.stacked)
        self._graphs = self._compile_graphs()

    def extra_repr(self) -> str:
        return f"num_members={self.num_members}, reduction={self.reduction!r}, member_inputs={self.member_inputs}"

    def to(self, *args, **kwargs):
        """``nn.Module.to``; a ``memory_format`` lays out each member's slice of the stacked 4-D/5-D tensors as
        ``member.to(memory_format=...)`` would (the member dim stays outermost): ``fused.to(memory_format=
        torch.channels_last)`` gives the grouped convolutions channels_last weights, as it does a member's."""
        device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        if memory_format is None or memory_format == torch.preserve_format:
            return super().to(*args, **kwargs)
        # nn.Module.to would apply the format to the stacks themselves: one rank too many for channels_last.
        super().to(device=device, dtype=dtype, non_blocking=non_blocking)
        return self._apply(lambda tensor: with_member_memory_format(tensor, memory_format))

    def forward(self, *inputs, **keyword_inputs):
        """The members' forward on ``inputs`` (positional and keyword, as the member takes them). Tensors are
        ``[B, ...]`` shared by every member, or with ``member_inputs=True`` ``[N, B, ...]`` (an input wrapped in
        ``fused_ensemble.shared(...)`` is every member's, whole); other values (numbers, flags, None) are passed to
        every member as they are. The output has the structure the member's forward gives for such a call: inputs
        that are None (or left out with a None default) are traced as None (see ``fused_ensemble.fusion.tracing``)."""
        inputs, keyword_inputs = with_layouts(inputs, keyword_inputs, self.member_inputs, self.num_members)
        values = [x for x, _ in inputs]
        keyword_values = {name: x for name, (x, _) in keyword_inputs.items()}
        if not torch.compiler.is_compiling():
            # A process-wide malloc setting (ctypes) cannot be traced: a compiled forward relies on an eager CPU
            # forward, optimize(), or cpu_memory.retain_freed_cpu_memory() having made it.
            cpu_memory.retain_for(values + list(keyword_values.values()))
        context = FusionContext(self.num_members, config.conv_backward_mode())
        outputs = self._graph_for(values, keyword_values).run(inputs, keyword_inputs, context)
        return self.reduce(outputs)

    def reduce(self, outputs: torch.Tensor) -> torch.Tensor:
        """Applies this ensemble's ``reduction`` to member outputs ``[N, B, ...]``."""
        return reduce_members(outputs, self.reduction)

    def optimize(self, example_input: torch.Tensor, dtype: torch.dtype | None = None,
                 cuda_graph: bool | None = None, compile: bool = False) -> OptimizedEnsemble:
        """An inference module with this ensemble's outputs (within ``dtype``'s tolerance), tuned for the example
        input's device, dtype and sample shape: BatchNorm folded into convolutions, weights cast to ``dtype``
        (default: unchanged), each convolution run grouped or as N dense convolutions, whichever was faster on the
        example, the fastest of the fused graph, the member loop and vmap, in the faster memory format; with
        ``compile=True`` the chosen forward under ``torch.compile`` when that is faster (compiling takes seconds to
        minutes); on CUDA a CUDA graph when ``cuda_graph`` is True or, by default, when replaying one is faster.
        Inputs of another device, dtype or sample shape raise a ValueError. Same as
        ``fused_ensemble.OptimizedEnsemble(self, example_input, ...)``."""
        from fused_ensemble.inference.optimized import OptimizedEnsemble

        return OptimizedEnsemble(self, example_input, dtype=dtype, cuda_graph=cuda_graph, compile=compile)

    def to_members(self) -> list[nn.Module]:
        """The N members as ordinary modules, with this module's current weights, buffers, device and mode."""
        return [unstack_member(self.stacked, index) for index in range(self.num_members)]

    def set_member(self, index: int, member: nn.Module) -> None:
        """Replaces member ``index``'s parameters and buffers (in place) with ``member``'s: a diverged member
        restarted from a fresh initialization, or another member's weights copied over (population-based
        training). ``member`` must have the members' architecture; the other members are untouched. Pair it with
        the optimizer's ``reset_member(index)`` to restart that member's optimizer state too."""
        index = member_index(index, self.num_members)
        check_replacement(self.stacked, member, index)
        with torch.no_grad():
            for name, tensor in member.named_parameters():
                self.stacked.get_parameter(name)[index].copy_(tensor)
            for name, tensor in member.named_buffers():
                self.stacked.get_buffer(name)[index].copy_(tensor)
