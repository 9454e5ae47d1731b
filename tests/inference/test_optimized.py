"""FusedEnsemble.optimize(): same outputs as the plain fused module, every strategy, clear errors on misuse."""

import pytest
import torch
from torch import nn

from fused_ensemble import FusedEnsemble, OptimizedEnsemble
from fused_ensemble.cli.models import build_model, input_shape
from fused_ensemble.cli.workloads import randomize_state
from fused_ensemble.inference.prepared_conv import PreparedConv

BENCHMARK_MODELS = ["mlp", "lenet", "resnet18-cifar"]


def _members(name, n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    return [randomize_state(build_model(name), generator).eval() for _ in range(n)]


def _assert_close_fp32(out, ref):
    rel = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert rel <= 1e-5, rel
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", BENCHMARK_MODELS)
@pytest.mark.parametrize("reduction", ["mean_probs", "none"])
def test_optimized_matches_fused(name, reduction):
    fused = FusedEnsemble(_members(name, 3), reduction=reduction).eval()
    x = torch.randn(2, *input_shape(name))
    optimized = fused.optimize(x)
    with torch.no_grad():
        _assert_close_fp32(optimized(x), fused(x))
        # another batch size reuses the tuned module
        x5 = torch.randn(5, *input_shape(name))
        _assert_close_fp32(optimized(x5), fused(x5))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50"])
def test_optimized_matches_fused_torchvision(name):
    fused = FusedEnsemble(_members(name, 2)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _assert_close_fp32(fused.optimize(x)(x), fused(x))


def test_batchnorm_is_folded_and_every_conv_prepared():
    fused = FusedEnsemble(_members("resnet18-cifar", 2)).eval()
    optimized = fused.optimize(torch.randn(1, 3, 32, 32))
    assert optimized.folded_batchnorms == 20
    convs = [m for m in optimized.modules() if isinstance(m, PreparedConv)]
    assert len(convs) == 20
    assert not any(isinstance(m, nn.BatchNorm2d) and m in convs for m in optimized.modules())
    # the fused module itself is untouched
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fused.modules()) == 20


@pytest.fixture
def force_execution(monkeypatch):
    """Makes optimize() keep the given execution instead of timing the candidates."""
    def force(execution):
        monkeypatch.setattr(OptimizedEnsemble, "_executions", lambda self: (execution,))
    return force


@pytest.mark.parametrize("execution", ["member_loop", "vmap"])
@pytest.mark.parametrize("member_inputs", [False, True])
@pytest.mark.parametrize("name", ["lenet", "resnet18-cifar"])
def test_member_loop_and_vmap_executions_are_exact(force_execution, name, member_inputs, execution):
    force_execution(execution)
    members = _members(name, 3)
    fused = FusedEnsemble(members, reduction="none", member_inputs=member_inputs).eval()
    x = torch.randn(*((3,) if member_inputs else ()), 2, *input_shape(name))
    optimized = fused.optimize(x)
    assert optimized.execution == execution
    with torch.no_grad():
        _assert_close_fp32(optimized(x), fused(x))


def test_fused_execution_drops_the_member_copies(force_execution):
    force_execution("fused")
    optimized = FusedEnsemble(_members("lenet", 2)).eval().optimize(torch.randn(2, *input_shape("lenet")))
    assert optimized.execution == "fused" and optimized.members is None


@pytest.mark.parametrize("strategy", ["grouped", "per_member"])
def test_each_conv_strategy_is_exact(force_execution, strategy):
    force_execution("fused")
    members = _members("lenet", 3)
    fused = FusedEnsemble(members, reduction="none", member_inputs=True).eval()
    x = torch.randn(3, 2, *input_shape("lenet"))
    optimized = fused.optimize(x)
    for conv in optimized.convolutions:
        conv.strategy = strategy
    with torch.no_grad():
        loop = torch.stack([m(x[i]) for i, m in enumerate(members)])
        _assert_close_fp32(optimized(x), loop)


class FakeClock:
    """A clock for ``fused_ensemble.inference.timing``: every reading advances it by ``tick`` seconds, and
    ``spend`` adds time, so a candidate is as slow as a test says, whatever the machine's load."""

    def __init__(self, tick=0.1):
        self.now, self.tick = 0.0, tick

    def __call__(self):
        self.now += self.tick
        return self.now

    def spend(self, seconds):
        self.now += seconds


@pytest.fixture
def fake_clock(monkeypatch):
    from fused_ensemble.inference import timing

    clock = FakeClock()
    monkeypatch.setattr(timing, "clock", clock)
    return clock


def test_cpu_timings_read_the_replaceable_clock(fake_clock):
    from fused_ensemble.inference.timing import interleaved_times, time_ms

    assert time_ms(lambda: fake_clock.spend(0.5), "cpu", reps=3) == pytest.approx([600.0] * 3)
    times = interleaved_times({"a": lambda: None, "b": lambda: fake_clock.spend(0.02)}, "cpu", min_reps=2)
    assert all(ms == pytest.approx(100.0) for ms in times["a"]) and all(ms == pytest.approx(120.0) for ms in times["b"])


@pytest.mark.parametrize("slow_strategy", ["grouped", "per_member"])
def test_strategy_choice_is_timed_per_layer(monkeypatch, fake_clock, slow_strategy):
    """Tuning keeps the faster strategy: make one slower on the fake clock and the other must win everywhere."""
    original = getattr(PreparedConv, f"_{slow_strategy}")

    def slow(self, x, layout):
        fake_clock.spend(0.02)
        return original(self, x, layout)

    monkeypatch.setattr(PreparedConv, f"_{slow_strategy}", slow)
    fused = FusedEnsemble(_members("lenet", 2), member_inputs=True).eval()
    optimized = fused.optimize(torch.randn(2, 2, *input_shape("lenet")))
    fast = {"grouped": "per_member", "per_member": "grouped"}[slow_strategy]
    assert [c.strategy for c in optimized.convolutions] == [fast, fast]
    assert all(c.autotune_reps == 0 for c in optimized.convolutions)


def test_conv_padding_modes_and_groups(force_execution):
    force_execution("fused")

    class Member(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", groups=2)
            self.bn = nn.BatchNorm2d(6)
            self.b = nn.Conv2d(6, 4, 3, padding=1, padding_mode="circular", bias=False)

        def forward(self, x):
            return self.b(torch.relu(self.bn(self.a(x)))).mean((2, 3))

    generator = torch.Generator().manual_seed(1)
    members = [randomize_state(Member(), generator).eval() for _ in range(3)]
    fused = FusedEnsemble(members, reduction="none").eval()
    x = torch.randn(2, 4, 7, 9)
    optimized = fused.optimize(x)
    with torch.no_grad():
        loop = torch.stack([m(x) for m in members])
        for strategy in ("grouped", "per_member"):
            for conv in optimized.convolutions:
                conv.strategy = strategy
            _assert_close_fp32(optimized(x), loop)


def test_bfloat16_within_bf16_tolerance():
    fused = FusedEnsemble(_members("lenet", 3)).eval()
    x = torch.randn(4, *input_shape("lenet"))
    optimized = fused.optimize(x, dtype=torch.bfloat16)
    assert optimized.compute_dtype == torch.bfloat16
    with torch.no_grad():
        out, ref = optimized(x), fused(x)
    assert out.dtype == torch.float32  # the reduction accumulates and returns float32
    torch.testing.assert_close(out, ref, rtol=1.6e-2, atol=1e-2)


def test_input_mismatches_raise_clear_errors():
    fused = FusedEnsemble(_members("lenet", 2)).eval()
    optimized = fused.optimize(torch.randn(2, *input_shape("lenet")))
    with pytest.raises(ValueError, match="tuned for torch.float32 inputs, got torch.float64"):
        optimized(torch.randn(2, *input_shape("lenet"), dtype=torch.float64))
    with pytest.raises(ValueError, match=r"tuned for samples of shape \(1, 28, 28\)"):
        optimized(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA example input"):
        fused.optimize(torch.randn(2, *input_shape("lenet")), cuda_graph=True)


def test_member_inputs_leading_size_checked():
    fused = FusedEnsemble(_members("mlp", 3), member_inputs=True).eval()
    optimized = fused.optimize(torch.randn(3, 2, *input_shape("mlp")))
    with pytest.raises(ValueError, match="N=3"):
        optimized(torch.randn(2, 2, *input_shape("mlp")))


def test_optimized_is_a_snapshot():
    fused = FusedEnsemble(_members("mlp", 2)).eval()
    x = torch.randn(3, *input_shape("mlp"))
    optimized = fused.optimize(x)
    before = optimized(x)
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(1.0)
    torch.testing.assert_close(optimized(x), before, rtol=0, atol=0)
    assert isinstance(optimized, OptimizedEnsemble)
    assert not any(p.requires_grad for p in optimized.parameters())


@pytest.mark.slow
def test_optimized_under_torch_compile_fullgraph():
    fused = FusedEnsemble(_members("lenet", 2)).eval()
    x = torch.randn(2, *input_shape("lenet"))
    optimized = fused.optimize(x)
    compiled = torch.compile(optimized, fullgraph=True)
    with torch.no_grad():
        _assert_close_fp32(compiled(x), optimized(x))


@pytest.mark.slow
def test_compile_candidate_matches_and_is_kept_only_when_faster(monkeypatch):
    fused = FusedEnsemble(_members("lenet", 3)).eval()
    x = torch.randn(4, *input_shape("lenet"))
    optimized = fused.optimize(x, compile=True)
    assert f"compiled={optimized.compiled}" in optimized.extra_repr()
    with torch.no_grad():
        _assert_close_fp32(optimized(x), fused(x))
        x2 = torch.randn(7, *input_shape("lenet"))  # another batch size recompiles, still right
        _assert_close_fp32(optimized(x2), fused(x2))
        # Under an outer torch.compile the eager forward is what gets traced.
        _assert_close_fp32(torch.compile(optimized, fullgraph=True)(x), fused(x))
    # A compiled forward that is not faster is not kept (every candidate timed equal here).
    from fused_ensemble.inference import optimized as optimized_module

    monkeypatch.setattr(optimized_module, "interleaved_times", lambda fns, *args, **kwargs: {k: [1.0] for k in fns})
    assert fused.optimize(x, compile=True).compiled is False


@pytest.mark.slow
def test_compiled_candidates_do_not_share_dynamo_recompile_budget():
    # Dynamo stops compiling a code object after 8 recompiles and runs it eagerly: 4 ensembles x 3 executions
    # must still each compile their own graph.
    from torch._dynamo.utils import counters

    x = torch.randn(2, *input_shape("mlp"))
    before = counters["stats"]["unique_graphs"]
    for seed in range(4):
        FusedEnsemble(_members("mlp", 2 + seed, seed)).eval().optimize(x, compile=True)
    assert counters["stats"]["unique_graphs"] - before >= 12


def test_compile_failure_keeps_the_eager_forward(monkeypatch):
    def broken_compile(fn, *args, **kwargs):
        def run(*a, **k):
            raise RuntimeError("no C++ compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    fused = FusedEnsemble(_members("mlp", 2)).eval()
    x = torch.randn(3, *input_shape("mlp"))
    with pytest.warns(UserWarning, match="torch.compile failed .*no C.. compiler here"):
        optimized = fused.optimize(x, compile=True)
    assert optimized.compiled is False
    with torch.no_grad():
        _assert_close_fp32(optimized(x), fused(x))


def test_a_compiled_forward_with_other_outputs_is_refused(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, *args, **kwargs: (lambda x: fn(x) + 1.0))
    fused = FusedEnsemble(_members("mlp", 2)).eval()
    with pytest.warns(UserWarning, match="differs from the eager one"):
        optimized = fused.optimize(torch.randn(3, *input_shape("mlp")), compile=True)
    assert optimized.compiled is False


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [True, False])
def test_cuda_graph_path_matches_eager(cuda_graph):
    fused = FusedEnsemble(_members("resnet18-cifar", 4)).eval().cuda()
    x = torch.randn(2, 3, 32, 32, device="cuda")
    optimized = fused.optimize(x, dtype=torch.bfloat16, cuda_graph=cuda_graph)
    assert optimized.cuda_graph is cuda_graph
    with torch.no_grad():
        ref = fused(x)
        torch.testing.assert_close(optimized(x), ref, rtol=3e-2, atol=3e-2)
        x2 = torch.randn(5, 3, 32, 32, device="cuda")  # a new batch size captures a new graph
        torch.testing.assert_close(optimized(x2), fused(x2), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("name", ["mlp", "resnet18-cifar"])
@pytest.mark.parametrize("reduction", ["mean_probs", "log_mean_probs", "softmax_of_mean", "mean"])
def test_final_linear_runs_fused_with_the_reduction(force_execution, name, reduction):
    """The member's last Linear is cut off the graph and run with the reduction by ensemble_linear_reduce: the
    batched GEMM + ensemble_reduce, and the Triton kernel (interpreted here) that never stores the member logits."""
    force_execution("fused")
    fused = FusedEnsemble(_members(name, 3), reduction=reduction).eval()
    x = torch.randn(2, *input_shape(name))
    optimized = fused.optimize(x)
    assert optimized.head is not None and optimized.head.weight.shape[:2] == (3, 10)
    with torch.no_grad():
        reference = fused(x)
        for backend in ("gemm", "triton"):
            optimized.head_backend = backend
            _assert_close_fp32(optimized(x), reference)


def test_no_fused_head_without_a_reduction_or_a_final_linear(force_execution):
    force_execution("fused")
    x = torch.randn(2, *input_shape("lenet"))
    assert FusedEnsemble(_members("lenet", 2), reduction="none").eval().optimize(x).head is None

    class EndsInPooling(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            return self.conv(x).mean((2, 3))

    members = [EndsInPooling().eval() for _ in range(2)]
    assert FusedEnsemble(members).eval().optimize(torch.randn(2, 1, 8, 8)).head is None


class RecurrentClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(6, 8)
        self.rnn = nn.GRU(8, 8, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.rnn(torch.relu(self.encoder(x)))[0][:, -1])


def test_recurrent_members_skip_the_vmap_candidate():
    """torch.vmap has no batching rule for recurrent layers: optimize() leaves that execution out and still
    matches the fused module."""
    torch.manual_seed(0)
    fused = FusedEnsemble([RecurrentClassifier().eval() for _ in range(3)])
    x = torch.randn(5, 7, 6)
    optimized = fused.optimize(x)
    assert "vmap" in optimized._cannot_run and optimized.execution in ("fused", "member_loop")
    with torch.no_grad():
        _assert_close_fp32(optimized(x), fused(x))
