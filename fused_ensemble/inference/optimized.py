"""``FusedEnsemble.optimize``: an inference module tuned on an example input for one device and dtype.

What it does, each step kept only where it is exact or measured faster on the example input:
- folds eval-mode BatchNorm into the preceding convolution (exact up to rounding; done in float64);
- casts weights to ``dtype`` (the reductions still accumulate in float32);
- lays convolution weights out once, and picks per convolution between one grouped convolution and N dense
  ones by timing both on the layer's real input;
- times the whole forward in contiguous and channels_last memory (with 2D convolutions) x the tuned fused graph,
  the N (BatchNorm-folded) members run one after another, or torch.func's vmap of them, and keeps the fastest: on
  a CPU the members' activations stay in cache between layers, which a fused layout loses;
- on CUDA, when the member ends in a Linear layer, times running it fused with the reduction (one Triton kernel,
  fused_ensemble.ensemble_linear_reduce: the [N, B, K] logits never reach memory) against GEMM + ensemble_reduce;
- with ``compile=True``, compiles each execution with ``torch.compile`` (inductor fuses the elementwise ops
  between layers and drops the Python overhead) and keeps the fastest of those that give the same outputs and of
  the eager choice. Off by default: compiling takes seconds to minutes;
- on CUDA, captures the forward in a CUDA graph (static input buffer, one graph per input shape) when
  ``cuda_graph=True``, or by default when replaying the graph is faster than running eagerly.
"""

from __future__ import annotations

import copy
import types
import warnings

import torch
from torch import nn

from fused_ensemble import cpu_memory
from fused_ensemble.fusion import hooks
from fused_ensemble.fusion.graph_runner import FusedGraph
from fused_ensemble.fusion.layout import Layout
from fused_ensemble.fusion.rules.linear import member_linear
from fused_ensemble.fusion.tracing import trace_member
from fused_ensemble.inference.batchnorm_folding import fold_batchnorm
from fused_ensemble.inference.prepared_conv import PreparedConv
from fused_ensemble.inference.timing import interleaved_times, median, time_ms
from fused_ensemble.ops.ensemble_head import ensemble_linear_reduce
from fused_ensemble.ops.ensemble_reduce import reduce_members

_TUNING_REPS = 3
HEAD_BACKENDS = ("gemm", "triton")
"""How a final Linear runs with the reduction: one batched GEMM then ``ensemble_reduce``, or the fused Triton head."""
# Launch overhead is tens of microseconds per kernel: a forward slower than this gains little from a CUDA graph,
# whose private memory pool would keep every activation of the batch alive.
_GRAPH_WORTH_TRYING_BELOW_MS = 20.0


def _replace_convolutions(graph, stacked: nn.Module, memory_format) -> list[PreparedConv]:
    prepared = []
    for node in graph.nodes:
        if node.op != "call_module" or not node.target:  # a member that is one layer: the root stays itself
            continue
        module = stacked.get_submodule(node.target)
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            parent_path, _, name = node.target.rpartition(".")
            parent = stacked.get_submodule(parent_path) if parent_path else stacked
            layer = PreparedConv(module, memory_format)
            setattr(parent, name, layer)
            prepared.append(layer)
        elif isinstance(module, PreparedConv):
            prepared.append(module)
    return prepared


def _fastest(candidates: dict, device: str) -> tuple[object, float]:
    """The key of the fastest of ``candidates`` (callables) and its median ms: each timed for about 0.2 s (at
    least 5 calls; sub-millisecond forwards need many calls for a choice between candidates a few percent apart),
    in interleaved rounds so that a machine whose speed drifts meanwhile favours none of them."""
    times = interleaved_times(candidates, device, _TUNING_REPS + 2, budget_ms=200.0)
    medians = {key: median(ms) for key, ms in times.items()}
    best = min(medians, key=medians.get)
    return best, medians[best]


def _with_own_code(method):
    """``method`` (bound) with a function whose code object is a copy of its own. Dynamo keeps compiled graphs
    and counts recompiles per code object (8 by default, then it silently runs eagerly): without a copy, every
    compiled candidate of every OptimizedEnsemble in the process would share ``_eager``'s."""
    func = method.__func__
    own = types.FunctionType(func.__code__.replace(), func.__globals__, func.__name__, func.__defaults__,
                             func.__closure__)
    return types.MethodType(own, method.__self__)


def _split_head(graph, stacked: nn.Module) -> nn.Linear | None:
    """If the member ends in a Linear whose output is the member's output, cuts it off the graph (which then returns
    the features) and returns the stacked Linear, so that it can run fused with the ensemble reduction."""
    output = next(node for node in graph.nodes if node.op == "output")
    last = output.args[0]
    if not isinstance(last, torch.fx.Node) or last.op != "call_module" or len(last.users) != 1:
        return None
    head = stacked.get_submodule(last.target)
    if type(head) is not nn.Linear or len(last.args) != 1 or last.kwargs:
        return None
    output.replace_input_with(last, last.args[0])
    graph.erase_node(last)
    return head


def _folded_members(fused: nn.Module, device: torch.device, dtype: torch.dtype) -> list[nn.Module]:
    """The members as ordinary eval-mode modules with BatchNorm folded into convolutions where torch.fx can."""
    from torch.fx.experimental.optimization import fuse as fold_conv_batchnorm

    members = []
    for member in fused.to_members():
        member = member.eval().to(device)
        try:
            member = fold_conv_batchnorm(member)
        except Exception:  # an untraceable member still runs, unfolded
            pass
        members.append(member.to(dtype).requires_grad_(False))
    return members


class OptimizedEnsemble(nn.Module):
    """Inference-only version of a ``FusedEnsemble`` (see ``FusedEnsemble.optimize``). Call it with inputs of the
    example's device, dtype and per-sample shape; the batch size may change (a CUDA graph is then captured for the
    new shape). Its weights are a snapshot: re-run ``optimize`` after training the fused module."""

    def __init__(self, fused: nn.Module, example_input: torch.Tensor, dtype: torch.dtype | None = None,
                 cuda_graph: bool | None = None, compile: bool = False):
        super().__init__()
        if not isinstance(example_input, torch.Tensor):
            raise TypeError(f"example_input must be a tensor, got {type(example_input).__name__}")
        hooks.refuse_hooks_on(list(fused.stacked.named_modules()),
                                    "optimize() cannot run module hooks (its member loop, vmap and compiled "
                                    "executions would each see other tensors); remove them before optimize()")
        self.num_members = fused.num_members
        self.reduction = fused.reduction
        self.member_inputs = fused.member_inputs
        self.device = example_input.device
        self.input_dtype = example_input.dtype
        self.sample_shape = tuple(example_input.shape[2 if self.member_inputs else 1:])
        param = next(fused.stacked.parameters(), None)
        self.compute_dtype = dtype or (param.dtype if param is not None else example_input.dtype)
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA example input, got one on {self.device}")

        # Tuning times the candidates: on the CPU, with the allocator the fused module's own forward settles.
        cpu_memory.retain_for([example_input])
        stacked = copy.deepcopy(fused.stacked).eval().to(self.device)
        graph = trace_member(stacked, training=False)
        self.folded_batchnorms = fold_batchnorm(graph, stacked)
        self.stacked = stacked.to(self.compute_dtype).requires_grad_(False)
        self.convolutions = _replace_convolutions(graph, self.stacked, torch.contiguous_format)
        self.head = _split_head(graph, self.stacked) if self.reduction != "none" else None
        self.head_backend = "gemm"
        self._graph = FusedGraph(graph, self.stacked, self.num_members)
        self.memory_format = torch.contiguous_format
        self._cuda_graphs: dict[tuple, tuple] = {}
        self.cuda_graph = False
        self.compiled = False
        self._compiled_forward = None

        self.execution = "fused"
        self.members = nn.ModuleList(_folded_members(fused, self.device, self.compute_dtype))
        self._vmap = None
        self._cannot_run: set[str] = set()

        x = example_input
        self._check_input(x)
        self._tune(x)
        if self.execution == "fused" and self.head is not None and self.device.type == "cuda":
            self.head_backend = self._fastest_head_backend(x)
        if compile:
            self._tune_compiled(x)
        if self.execution != "vmap":
            self._vmap = None  # drop the stacked copy of the weights
        if self.execution == "fused":
            self.members = None  # drop the second copy of the weights
        if self.device.type == "cuda":
            self.cuda_graph = self._graph_is_faster(x) if cuda_graph is None else bool(cuda_graph)

    def __getstate__(self):
        # Its forward is tied to this process and device: FusedGraph closures over this module's layers, CUDA graphs
        # and compiled code, none of which a copy could share safely (a deepcopy would run the original's weights).
        raise TypeError("an OptimizedEnsemble cannot be copied or pickled: it is tuned for one process and device "
                        "(CUDA graphs, compiled code); copy or save the FusedEnsemble (or its state_dict) and call "
                        "optimize() on the copy")

    def extra_repr(self) -> str:
        strategies = [c.strategy for c in self.convolutions]
        head = f"fused_head={self.head_backend!r}, " if self.head is not None else ""
        return (f"num_members={self.num_members}, execution={self.execution!r}, {head}reduction={self.reduction!r}, "
                f"dtype={self.compute_dtype}, "
                f"folded_batchnorms={self.folded_batchnorms}, grouped_convs={strategies.count('grouped')}, "
                f"per_member_convs={strategies.count('per_member')}, memory_format={self.memory_format}, "
                f"compiled={self.compiled}, cuda_graph={self.cuda_graph}")

    # ---- tuning ---------------------------------------------------------------------------------------------

    def _autotune(self, x: torch.Tensor) -> None:
        for conv in self.convolutions:
            conv.autotune_reps = _TUNING_REPS
        with torch.no_grad():
            self._eager(x)

    def _tune(self, x: torch.Tensor) -> None:
        """Keeps the fastest of: contiguous or channels_last memory (when there are 2D convolutions) x the fused
        graph (with per-convolution strategies tuned for that memory format), the N BatchNorm-folded members run
        one after another, or their torch.func vmap. On a CPU the members' activations stay in cache between
        layers, which can beat any fused layout; on a GPU the fused graph wins."""
        formats = [torch.contiguous_format]
        if any(c.weight.dim() == 4 for c in self.convolutions):
            formats.append(torch.channels_last)
        best = None
        for memory_format in formats:
            self._set_memory_format(memory_format)
            self.execution = "fused"
            self._autotune(x)
            strategies = [c.strategy for c in self.convolutions]
            execution, ms = _fastest(self._runnable({execution: self._eager_as(execution, x)
                                                     for execution in self._executions()}), self.device.type)
            if best is None or ms < best[0]:
                best = (ms, memory_format, execution, strategies)
        _, memory_format, self.execution, strategies = best
        self._set_memory_format(memory_format)
        for conv, strategy in zip(self.convolutions, strategies):
            conv.strategy = strategy

    def _runnable(self, candidates: dict) -> dict:
        """The candidates that run: torch.vmap has no batching rule for some layers (recurrent ones), so a member
        network with one cannot take the vmap execution (it is then left out of later choices too). The fused
        graph must run."""
        runnable = {}
        for name, run in candidates.items():
            try:
                with torch.no_grad():
                    run()
            except RuntimeError:
                if name == "fused":
                    raise
                self._cannot_run.add(name)
                continue
            runnable[name] = run
        return runnable

    def _executions(self) -> tuple[str, ...]:
        executions = ("fused", "member_loop", "vmap") if self.members is not None else ("fused",)
        return tuple(e for e in executions if e not in self._cannot_run)

    def _vmapped_members(self):
        """torch.func's vmap of the (BatchNorm-folded) member over stacked weights: one batched op per layer.
        Built on first use; dropped with the members when another execution wins."""
        if self._vmap is None:
            # Stacked by hand: torch.func.stack_module_state refuses the members after BatchNorm folding, since
            # torch.fx gives every folded GraphModule a class of its own.
            with torch.no_grad():
                params = {name: torch.stack([m.get_parameter(name) for m in self.members])
                          for name, _ in self.members[0].named_parameters()}
                buffers = {name: torch.stack([m.get_buffer(name) for m in self.members])
                           for name, _ in self.members[0].named_buffers()}
            base = copy.deepcopy(self.members[0]).to("meta")

            def one_member(p, b, x):
                return torch.func.functional_call(base, (p, b), (x,))

            run = torch.vmap(one_member, in_dims=(0, 0, 0 if self.member_inputs else None))
            self._vmap = lambda x: run(params, buffers, x)
        return self._vmap

    def _fastest_head_backend(self, x: torch.Tensor) -> str:
        """The final Linear + reduction as one Triton kernel (no [N, B, K] logits in memory) or as GEMM + reduce."""
        timings = {}
        for backend in HEAD_BACKENDS:
            self.head_backend = backend
            try:
                timings[backend] = median(time_ms(lambda: self._eager(x), "cuda", _TUNING_REPS + 2))
            except Exception as error:  # a kernel that fails to build here must not break optimize()
                warnings.warn(f"fused ensemble head kernel unavailable ({type(error).__name__}: {error}); "
                              f"using GEMM + ensemble_reduce", stacklevel=3)
        return min(timings, key=timings.get)

    def _tune_compiled(self, x: torch.Tensor) -> None:
        """Compiles every execution (fused graph, member loop, vmap) in the chosen memory format and keeps the
        fastest of them and the eager choice: compiled, the ranking can change (inductor fuses a member loop's
        or vmap's elementwise ops as well as the fused graph's). A compiled forward must match the eager outputs;
        a model torch.compile cannot handle here (or a machine without inductor's C++ compiler) keeps eager."""
        eager_execution = self.execution
        candidates = {(eager_execution, None): self._eager_as(eager_execution, x)}
        for execution in self._executions():
            self.execution = execution
            compiled = self._compiled(x)
            if compiled is not None:
                candidates[(execution, compiled)] = self._eager_as(execution, x, compiled)
        (self.execution, self._compiled_forward), _ = _fastest(candidates, self.device.type)
        self.compiled = self._compiled_forward is not None

    def _compiled(self, x: torch.Tensor):
        """``torch.compile`` of the current execution's forward, compiled on ``x`` and checked against eager, or
        None (with a warning) when it fails or differs."""
        compiled = torch.compile(_with_own_code(self._eager))
        try:
            with torch.no_grad():
                expected, actual = self._eager(x), compiled(x)  # the first compiled call compiles
        except Exception as error:
            warnings.warn(f"optimize(compile=True): torch.compile failed on the {self.execution} forward "
                          f"({type(error).__name__}: {error}); keeping it eager", stacklevel=4)
            return None
        tolerance = 1e-4 if self.compute_dtype == torch.float32 else 3e-2
        if not torch.allclose(actual, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item()):
            warnings.warn(f"optimize(compile=True): the compiled {self.execution} forward differs from the eager one; "
                          f"keeping it eager", stacklevel=4)
            return None
        return compiled

    def _set_memory_format(self, memory_format: torch.memory_format) -> None:
        self.memory_format = memory_format
        for conv in self.convolutions:
            if conv.weight.dim() == 4:
                conv.weight = conv.weight.contiguous(memory_format=memory_format)
        if self.members is not None:
            for member in self.members:
                member.to(memory_format=memory_format)

    def _graph_is_faster(self, x: torch.Tensor) -> bool:
        eager = median(time_ms(lambda: self._run(x), "cuda", 20, warmup=3))
        if eager > _GRAPH_WORTH_TRYING_BELOW_MS:
            return False
        graphed = median(time_ms(lambda: self._replay(x), "cuda", 20, warmup=3))
        if graphed >= eager:
            self._cuda_graphs.clear()  # give the graph's private memory pool back
        return graphed < eager

    # ---- running --------------------------------------------------------------------------------------------

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a tensor input, got {type(x).__name__}")
        if x.device != self.device:
            raise ValueError(f"this optimized ensemble was tuned for inputs on {self.device}, got one on {x.device}; "
                             f"call FusedEnsemble.optimize again with an example on that device")
        if x.dtype != self.input_dtype:
            raise ValueError(f"this optimized ensemble was tuned for {self.input_dtype} inputs, got {x.dtype}; "
                             f"call FusedEnsemble.optimize again with an example of that dtype")
        lead = 2 if self.member_inputs else 1
        if tuple(x.shape[lead:]) != self.sample_shape or x.dim() != lead + len(self.sample_shape):
            raise ValueError(f"this optimized ensemble was tuned for samples of shape {self.sample_shape}, got input "
                             f"of shape {tuple(x.shape)}")
        if self.member_inputs and x.shape[0] != self.num_members:
            raise ValueError(f"member_inputs=True expects input of shape [N, B, ...] with N={self.num_members}, "
                             f"got {tuple(x.shape)}")

    def _eager_as(self, execution: str, x: torch.Tensor, forward=None):
        """A callable that runs ``forward`` (default: the eager forward) on ``x`` with ``execution`` selected, for
        timing candidates in turns."""
        forward = forward or self._eager

        def run():
            self.execution = execution
            return forward(x)
        return run

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        if self.execution == "vmap":
            return reduce_members(self._vmapped_members()(x), self.reduction)
        if self.execution == "member_loop":
            inputs = x.unbind(0) if self.member_inputs else [x] * self.num_members
            inputs = [xi.contiguous(memory_format=self.memory_format) if xi.dim() == 4 else xi for xi in inputs]
            return reduce_members(torch.stack([m(xi) for m, xi in zip(self.members, inputs)]), self.reduction)
        if x.dim() == 4 and not self.member_inputs:
            x = x.contiguous(memory_format=self.memory_format)
        layout = Layout.MEMBER if self.member_inputs else Layout.SHARED
        outputs = self._graph.run([(x, layout)])
        if self.head is not None:
            if outputs.dim() == 3 and self.head_backend == "triton":  # [N, B, F] features: the fused kernel applies
                return ensemble_linear_reduce(outputs, self.head.weight, self.head.bias, self.reduction,
                                              backend="triton")
            outputs = member_linear(outputs, Layout.MEMBER, self.head.weight, self.head.bias, self.num_members)
        return reduce_members(outputs, self.reduction)

    def _replay(self, x: torch.Tensor) -> torch.Tensor:
        key = tuple(x.shape)
        if key not in self._cuda_graphs:
            static_input = x.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.no_grad():
                for _ in range(2):  # warm-up outside the graph: cuDNN/cuBLAS pick algorithms, allocate workspaces
                    self._run(static_input)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.no_grad():
                static_output = self._run(static_input)
            self._cuda_graphs[key] = (graph, static_input, static_output)
        graph, static_input, static_output = self._cuda_graphs[key]
        static_input.copy_(x)
        graph.replay()
        return static_output.clone()

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """The chosen forward: compiled (when ``compiled``) or eager. Under an outer torch.compile, eager: the outer
        compile traces it."""
        if self.compiled and not torch.compiler.is_compiling():
            return self._compiled_forward(x)
        return self._eager(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        with torch.no_grad():
            if self.cuda_graph and not torch.compiler.is_compiling():
                return self._replay(x)
            return self._run(x)
