"""Per-member optimizers on hand-made stacked parameters, against N separate torch.optim runs."""

import pytest
import torch

from fused_ensemble import optim
from fused_ensemble.extension import extension_status, has_cuda_kernels, load_extension
from fused_ensemble.training.member_values import per_member

N = 4
SHAPES = [(5, 3), (5,), (2, 3, 3, 3)]  # one member's parameter shapes: linear weight, bias, conv weight


def make_members(n=N, shapes=SHAPES, device="cpu"):
    return [[torch.randn(s, dtype=torch.float32, device=device, requires_grad=True) for s in shapes]
            for _ in range(n)]


def stack(members):
    """Leaf tensors with the member dim first, the layout of FusedEnsemble.parameters()."""
    return [torch.stack([m[j].detach() for m in members]).requires_grad_() for j in range(len(members[0]))]


def run_both(fused_cls, torch_cls, fused_kwargs, member_kwargs, steps=5, frozen_steps=None, device="cpu",
             members=None, stacked=None):
    """Runs the fused optimizer and N torch optimizers on the same random gradients; returns both.

    ``frozen_steps``: {step: [members frozen during that step]}; frozen members' torch optimizers skip it.
    ``members`` (each a list of one member's tensors) and ``stacked`` (their ``[N, ...]`` stacks, in any layout;
    the gradients take it) default to ``make_members(device=device)`` and ``stack(members)``.
    """
    members = make_members(device=device) if members is None else members
    stacked = stack(members) if stacked is None else stacked
    fused_opt = fused_cls(stacked, **fused_kwargs)
    torch_opts = [torch_cls(m, **member_kwargs(i)) for i, m in enumerate(members)]
    for step in range(steps):
        frozen = (frozen_steps or {}).get(step, [])
        for i in range(len(members)):
            (fused_opt.freeze if i in frozen else fused_opt.unfreeze)(i)
        grads = [torch.randn_like(p) for p in stacked]
        for p, g in zip(stacked, grads):
            p.grad = g.clone()
        fused_opt.step()
        for i, (m, opt) in enumerate(zip(members, torch_opts)):
            if i in frozen:
                continue
            for p, g in zip(m, grads):
                p.grad = g[i].clone()
            opt.step()
    return stacked, members, fused_opt, torch_opts


def assert_members_equal(stacked, members):
    for j, p in enumerate(stacked):
        for i, m in enumerate(members):
            torch.testing.assert_close(p[i], m[j], rtol=1.3e-6, atol=1e-6,
                                       msg=lambda s: f"member {i}, parameter {j}: {s}")


SGD_CASES = {
    "plain": (dict(lr=0.1), lambda i: dict(lr=0.1)),
    "lr_wd_per_member": (dict(lr=[0.1, 0.05, 0.02, 0.2], weight_decay=[0.0, 1e-2, 1e-3, 0.1]),
                         lambda i: dict(lr=[0.1, 0.05, 0.02, 0.2][i], weight_decay=[0.0, 1e-2, 1e-3, 0.1][i])),
    "momentum_dampening": (dict(lr=0.05, momentum=[0.9, 0.0, 0.5, 0.99], dampening=[0.1, 0.3, 0.0, 0.5]),
                           lambda i: dict(lr=0.05, momentum=[0.9, 0.0, 0.5, 0.99][i],
                                          dampening=[0.1, 0.3, 0.0, 0.5][i])),
    "nesterov_wd": (dict(lr=[0.1, 0.01, 0.03, 0.3], momentum=[0.9, 0.8, 0.7, 0.95], nesterov=True,
                         weight_decay=5e-4),
                    lambda i: dict(lr=[0.1, 0.01, 0.03, 0.3][i], momentum=[0.9, 0.8, 0.7, 0.95][i],
                                   nesterov=True, weight_decay=5e-4)),
}


# fused=None: the C++ kernels on the CPU (csrc/cpu/member_optimizers.cpp); fused=False: the chunked foreach ops.
KERNELS = pytest.mark.parametrize("fused", [None, False], ids=["cpp_kernels", "foreach"])


@KERNELS
@pytest.mark.parametrize("case", list(SGD_CASES))
def test_sgd_matches_torch_per_member(case, fused):
    fused_kwargs, member_kwargs = SGD_CASES[case]
    stacked, members, _, _ = run_both(optim.SGD, torch.optim.SGD, dict(fused_kwargs, fused=fused), member_kwargs)
    assert_members_equal(stacked, members)


ADAMW_CASES = {
    "defaults": (dict(), lambda i: dict()),
    "lr_wd_per_member": (dict(lr=[1e-3, 3e-4, 1e-2, 3e-3], weight_decay=[0.0, 1e-2, 0.1, 0.5]),
                         lambda i: dict(lr=[1e-3, 3e-4, 1e-2, 3e-3][i], weight_decay=[0.0, 1e-2, 0.1, 0.5][i])),
    "betas_eps_per_member": (dict(lr=1e-2, betas=([0.9, 0.8, 0.5, 0.0], 0.99), eps=[1e-8, 1e-6, 1e-3, 1e-8]),
                             lambda i: dict(lr=1e-2, betas=([0.9, 0.8, 0.5, 0.0][i], 0.99),
                                            eps=[1e-8, 1e-6, 1e-3, 1e-8][i])),
    "amsgrad": (dict(lr=[1e-2, 1e-3, 3e-3, 3e-2], betas=(0.9, [0.999, 0.99, 0.9, 0.5]), amsgrad=True),
                lambda i: dict(lr=[1e-2, 1e-3, 3e-3, 3e-2][i], betas=(0.9, [0.999, 0.99, 0.9, 0.5][i]),
                               amsgrad=True)),
}


@KERNELS
@pytest.mark.parametrize("case", list(ADAMW_CASES))
def test_adamw_matches_torch_per_member(case, fused):
    fused_kwargs, member_kwargs = ADAMW_CASES[case]
    stacked, members, fused_opt, torch_opts = run_both(optim.AdamW, torch.optim.AdamW,
                                                       dict(fused_kwargs, fused=fused), member_kwargs)
    assert_members_equal(stacked, members)
    for j, p in enumerate(stacked):
        state = fused_opt.state[p]
        for i in range(N):
            ref = torch_opts[i].state[members[i][j]]
            torch.testing.assert_close(state["exp_avg"][i], ref["exp_avg"], rtol=1.3e-6, atol=1e-7)
            torch.testing.assert_close(state["exp_avg_sq"][i], ref["exp_avg_sq"], rtol=1.3e-6, atol=1e-7)
            assert state["step"][i].item() == ref["step"].item()


ADAM_CASES = {
    "defaults": (dict(), lambda i: dict()),
    "l2_per_member": (dict(lr=[1e-3, 3e-4, 1e-2, 3e-3], weight_decay=[0.0, 1e-2, 0.1, 0.5]),
                      lambda i: dict(lr=[1e-3, 3e-4, 1e-2, 3e-3][i], weight_decay=[0.0, 1e-2, 0.1, 0.5][i])),
    "betas_eps_per_member": (dict(lr=1e-2, betas=([0.9, 0.8, 0.5, 0.0], 0.99), eps=[1e-8, 1e-6, 1e-3, 1e-8],
                                  weight_decay=1e-2),
                             lambda i: dict(lr=1e-2, betas=([0.9, 0.8, 0.5, 0.0][i], 0.99),
                                            eps=[1e-8, 1e-6, 1e-3, 1e-8][i], weight_decay=1e-2)),
    "amsgrad_l2": (dict(lr=[1e-2, 1e-3, 3e-3, 3e-2], betas=(0.9, [0.999, 0.99, 0.9, 0.5]), amsgrad=True,
                        weight_decay=[0.5, 0.0, 1e-2, 0.1]),
                   lambda i: dict(lr=[1e-2, 1e-3, 3e-3, 3e-2][i], betas=(0.9, [0.999, 0.99, 0.9, 0.5][i]),
                                  amsgrad=True, weight_decay=[0.5, 0.0, 1e-2, 0.1][i])),
}


@KERNELS
@pytest.mark.parametrize("case", list(ADAM_CASES))
def test_adam_matches_torch_per_member_with_frozen_members(case, fused):
    """L2 weight decay added to the gradient (torch.optim.Adam), not AdamW's decoupled decay; members 2, then 0 and
    3, frozen for a step each: their torch optimizers skip it."""
    fused_kwargs, member_kwargs = ADAM_CASES[case]
    stacked, members, fused_opt, torch_opts = run_both(optim.Adam, torch.optim.Adam, dict(fused_kwargs, fused=fused),
                                                       member_kwargs, steps=6, frozen_steps={1: [2], 3: [0, 3]})
    assert_members_equal(stacked, members)
    for j, p in enumerate(stacked):
        state = fused_opt.state[p]
        for i in range(N):
            ref = torch_opts[i].state[members[i][j]]
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in ref:
                    torch.testing.assert_close(state[key][i], ref[key], rtol=1.3e-6, atol=1e-7)
            assert state["step"][i].item() == ref["step"].item()


def test_adam_weight_decay_is_not_adamw_s():
    stacked = stack(make_members())
    runs = []
    for cls in (optim.Adam, optim.AdamW):
        params = [p.detach().clone().requires_grad_() for p in stacked]
        opt = cls(params, lr=1e-2, weight_decay=0.5)
        for _ in range(2):
            for p in params:
                p.grad = torch.ones_like(p)
            opt.step()
        runs.append(params)
    assert not torch.equal(runs[0][0], runs[1][0])
    assert isinstance(optim.AdamW(stacked), optim.Adam) and optim.Adam(stacked).defaults["weight_decay"] == 0.0


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, None], ids=["foreach", "default"])
@pytest.mark.parametrize("case", ["sgd-nesterov_wd", "sgd-momentum_dampening", "adamw-amsgrad",
                                  "adamw-lr_wd_per_member", "adamw-betas_eps_per_member", "adam-amsgrad_l2",
                                  "adam-l2_per_member"])
def test_matches_torch_on_cuda_with_a_frozen_member(case, fused):
    """CUDA runs the one-pass CUDA kernels by default (the foreach ops in a build without them), or the foreach ops
    on broadcast shapes through their per-tensor path (fused=False): same results."""
    kind, name = case.split("-", 1)
    cases, classes = {"sgd": (SGD_CASES, (optim.SGD, torch.optim.SGD)),
                      "adamw": (ADAMW_CASES, (optim.AdamW, torch.optim.AdamW)),
                      "adam": (ADAM_CASES, (optim.Adam, torch.optim.Adam))}[kind]
    fused_kwargs, member_kwargs = cases[name]
    stacked, members, _, _ = run_both(*classes, dict(fused_kwargs, fused=fused), member_kwargs,
                                      frozen_steps={2: [1], 3: [0, 2]}, device="cuda")
    assert_members_equal(stacked, members)


def test_cuda_parameters_take_the_cuda_kernels_by_default_where_built():
    params = [torch.zeros(N, 2, requires_grad=True)]
    default, foreach = optim.SGD(params, lr=0.1), optim.SGD(params, lr=0.1, fused=False)
    assert default._use_fused_kernels(torch.device("cuda"), torch.float32, []) is has_cuda_kernels()
    assert foreach._use_fused_kernels(torch.device("cuda"), torch.float32, []) is False
    # float16 parameters: the kernels do not take them, so the default falls back to the foreach ops...
    assert default._use_fused_kernels(torch.device("cuda"), torch.float16, []) is False
    # ...and fused=True says why.
    with pytest.raises(RuntimeError, match="float32 and float64"):
        optim.SGD(params, lr=0.1, fused=True)._use_fused_kernels(torch.device("cuda"), torch.float16, [])


@KERNELS
@pytest.mark.parametrize("cls, torch_cls, kwargs", [
    (optim.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-2)),
    (optim.AdamW, torch.optim.AdamW, dict(lr=1e-2)),
    (optim.Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1)),
])
def test_frozen_member_is_bitwise_unchanged_and_resumes(cls, torch_cls, kwargs, fused):
    members = make_members()
    stacked = stack(members)
    opt = cls(stacked, **kwargs, fused=fused)
    for p in stacked:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.freeze(2)
    before = [p.detach().clone() for p in stacked]
    state_before = [{k: v.clone() for k, v in opt.state[p].items()} for p in stacked]
    for p in stacked:
        p.grad = torch.randn_like(p)
        p.grad[2] = float("nan")  # a diverged member must not leak into the others or itself
    opt.step()
    assert opt.frozen_members == [2]
    for p, b, s_before in zip(stacked, before, state_before):
        assert torch.equal(p[2], b[2])
        assert not torch.equal(p[1], b[1])
        for k, v in opt.state[p].items():
            assert torch.equal(v[2], s_before[k][2]), k
        assert torch.isfinite(p).all()

    # Frozen at step 1 (0-based) only: member 2 must match a torch run that skipped that step.
    stacked_after, members_after, _, _ = run_both(cls, torch_cls, dict(kwargs, fused=fused), lambda i: kwargs,
                                                  steps=4, frozen_steps={1: [2], 2: [0, 2]})
    assert_members_equal(stacked_after, members_after)


@KERNELS
def test_frozen_from_the_start_then_unfrozen_matches_a_fresh_torch_run(fused):
    # Member 1's first step comes two steps after the others': its momentum buffer starts as its gradient then.
    kwargs = dict(lr=0.1, momentum=0.9, dampening=0.2)
    stacked, members, _, _ = run_both(optim.SGD, torch.optim.SGD, dict(kwargs, fused=fused), lambda i: kwargs,
                                      steps=4, frozen_steps={0: [1], 1: [1]})
    assert_members_equal(stacked, members)


@pytest.mark.parametrize("make", [
    lambda params, fused: optim.SGD(params, lr=[0.1, 0.05, 0.2, 0.3], momentum=[0.9, 0.0, 0.5, 0.9],
                                    weight_decay=[1e-2, 0, 1e-3, 1e-2], fused=fused),
    lambda params, fused: optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2, fused=fused),
    lambda params, fused: optim.AdamW(params, lr=[1e-3, 3e-3, 1e-2, 1e-3], weight_decay=[0.1, 0.0, 0.01, 0.1],
                                      amsgrad=True, fused=fused),
    lambda params, fused: optim.Adam(params, lr=[1e-3, 3e-3, 1e-2, 1e-3], weight_decay=[0.1, 0.0, 0.01, 0.1],
                                     amsgrad=True, fused=fused),
], ids=["sgd", "sgd_nesterov", "adamw_amsgrad", "adam_amsgrad_l2"])
def test_fused_kernels_and_foreach_ops_agree_and_leave_gradients_alone(make):
    runs = []
    for fused in (None, False):
        torch.manual_seed(3)
        params = stack(make_members())
        opt = make(params, fused)
        for _ in range(3):
            grads = [torch.randn_like(p) for p in params]
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
            assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
        runs.append([p.detach().clone() for p in params] + [t for p in params for t in _used_state(opt, p)])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1.3e-6, atol=1e-6)


def _used_state(opt, p):
    """The state tensors of ``p`` an update reads; the momentum buffer of a member with momentum 0 is not (the
    foreach ops fill it with the gradient, the C++ kernel leaves it alone; torch.optim has none)."""
    state = dict(optim._state_tensors(opt.state[p]))
    if "momentum_buffer" in state:
        momentum = torch.tensor(per_member(opt.param_groups[0]["momentum"], "momentum", opt.num_members))
        state["momentum_buffer"] = state["momentum_buffer"] * (momentum != 0).view(-1, *[1] * (p.dim() - 1))
    return list(state.values())


@pytest.mark.parametrize("cls", [optim.SGD, optim.Adam, optim.AdamW])
def test_fused_true_says_why_it_cannot_run_and_none_falls_back(cls):
    members = make_members()
    # [N, 5, 3] with the member dim innermost in memory: not N member slices one after another.
    transposed = [torch.stack([m[0].detach() for m in members], dim=1).transpose(0, 1).requires_grad_()]
    transposed[0].grad = torch.randn(5, N, 3).transpose(0, 1)
    with pytest.raises(RuntimeError, match="not dense with its member dim outermost"):
        cls(transposed, lr=0.1, fused=True).step()
    before = transposed[0].detach().clone()
    cls(transposed, lr=0.1).step()  # fused=None: the foreach ops
    assert not torch.equal(transposed[0], before)

    meta = [torch.empty(N, 3, device="meta", requires_grad=True)]
    meta[0].grad = torch.empty(N, 3, device="meta")
    with pytest.raises(RuntimeError, match="CPU and CUDA parameters, got meta ones"):
        cls(meta, lr=0.1, fused=True).step()
    with pytest.raises(TypeError, match="fused must be"):
        cls(meta, lr=0.1, fused="yes")


@pytest.mark.parametrize("cls, kwargs", [(optim.SGD, {}), (optim.AdamW, {}), (optim.Adam, dict(weight_decay=0.1))])
def test_cpu_default_runs_the_cpp_kernels(monkeypatch, cls, kwargs):
    if not load_extension():
        pytest.skip(f"the C++ extension is {extension_status()}")

    def foreach_ops(*args):
        raise AssertionError("the foreach ops ran")
    monkeypatch.setattr(cls, "_apply", foreach_ops)
    stacked = stack(make_members())
    before = [p.detach().clone() for p in stacked]
    opt = cls(stacked, lr=0.1, **kwargs)
    for p in stacked:
        p.grad = torch.randn_like(p)
    opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(stacked, before))


def _channels_last_stack(members, j):
    """Member j-th parameters [O, I, kh, kw] stacked as FusedEnsemble stacks channels_last members' weights:
    [N, O, I, kh, kw], members outermost, I innermost (not contiguous, but N dense member slices)."""
    w = torch.stack([m[j].detach() for m in members])
    return w.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3).requires_grad_()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("cls, torch_cls, kwargs", [
    (optim.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)),
    (optim.AdamW, torch.optim.AdamW, dict(lr=1e-2, amsgrad=True)),
    (optim.Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1)),  # L2-decayed gradients keep the layout
])
def test_channels_last_weights_take_the_kernels(monkeypatch, cls, torch_cls, kwargs, device):
    if not load_extension():
        pytest.skip(f"the C++ extension is {extension_status()}")
    if device == "cuda" and not has_cuda_kernels():
        pytest.skip("the extension was built without CUDA kernels")
    monkeypatch.setattr(cls, "_apply", lambda *args: pytest.fail("the foreach ops ran"))
    conv = SHAPES.index((2, 3, 3, 3))
    members = [[m[conv]] for m in make_members(device=device)]
    stacked = [_channels_last_stack(members, 0)]
    strides = stacked[0].stride()
    assert not stacked[0].is_contiguous()
    # The gradients come from randn_like: the parameter's strides, as autograd gives them.
    stacked, members, _, _ = run_both(cls, torch_cls, kwargs, lambda i: kwargs, steps=3, members=members,
                                      stacked=stacked)
    assert stacked[0].stride() == strides  # updated in place
    assert_members_equal(stacked, members)


def test_a_gradient_laid_out_unlike_its_parameter_takes_the_foreach_ops():
    members = make_members()
    conv = SHAPES.index((2, 3, 3, 3))
    runs = []
    for fused in (None, False):
        params = [_channels_last_stack(members, conv)]
        params[0].grad = torch.linspace(-1, 1, params[0].numel()).view(params[0].shape)  # contiguous
        optim.SGD(params, lr=0.1, momentum=0.9, fused=fused).step()
        runs.append(params[0].detach())
    assert torch.equal(*runs)
    params[0].grad = torch.zeros(params[0].shape)
    with pytest.raises(RuntimeError, match="laid out otherwise"):
        optim.SGD(params, lr=0.1, fused=True).step()


@pytest.mark.parametrize("layout, taken", [
    (lambda t: t, True),
    (lambda t: t.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3), True),  # channels_last members
    (lambda t: t.transpose(0, 1).contiguous().transpose(0, 1), False),  # member dim not outermost
    (lambda t: torch.cat([t, t], dim=2)[:, :, ::2], False),  # gaps: not dense
    (lambda t: t[:1], True),  # one member
    (lambda t: t[:, :1], False),  # each member's first output channel: gaps between the slices
    (lambda t: t.unsqueeze(2), True),  # a dim of size 1, whatever its stride
])
def test_member_major_dense(layout, taken):
    assert optim._member_major_dense(layout(torch.randn(N, 2, 3, 3, 3))) is taken


def test_half_precision_parameters_take_the_foreach_ops():
    torch.manual_seed(0)
    runs = []
    for fused in (None, False):
        params = [torch.linspace(-1, 1, N * 30, dtype=torch.bfloat16).view(N, 6, 5).requires_grad_()]
        opt = optim.AdamW(params, lr=[1e-2, 2e-2, 3e-2, 4e-2], fused=fused)
        for step in range(3):
            params[0].grad = torch.linspace(-step, 1, N * 30, dtype=torch.bfloat16).view(N, 6, 5)
            opt.step()
        runs.append(params[0].detach())
    assert torch.equal(*runs)
    with pytest.raises(RuntimeError, match="float32 and float64"):
        optim.AdamW(params, fused=True).step()


def test_fused_true_without_the_extension_says_so(monkeypatch):
    monkeypatch.setattr(optim, "load_extension", lambda: False)
    monkeypatch.setattr(optim, "extension_status", lambda: "not built (no fused_ensemble/_C*.so)")
    stacked = stack(make_members())
    for p in stacked:
        p.grad = torch.randn_like(p)
    with pytest.raises(RuntimeError, match=r"compiled extension is not built"):
        optim.SGD(stacked, lr=0.1, fused=True).step()
    optim.SGD(stacked, lr=0.1).step()  # fused=None: the foreach ops


def test_param_groups_have_their_own_per_member_values():
    members = make_members()
    stacked = stack(members)
    lrs = ([0.1, 0.2, 0.3, 0.4], [0.01, 0.02, 0.03, 0.04])
    opt = optim.SGD([{"params": stacked[:1], "lr": lrs[0]}, {"params": stacked[1:], "lr": lrs[1]}])
    refs = [torch.optim.SGD([{"params": m[:1], "lr": lrs[0][i]}, {"params": m[1:], "lr": lrs[1][i]}])
            for i, m in enumerate(members)]
    for _ in range(2):
        grads = [torch.randn_like(p) for p in stacked]
        for p, g in zip(stacked, grads):
            p.grad = g.clone()
        opt.step()
        for i, (m, ref) in enumerate(zip(members, refs)):
            for p, g in zip(m, grads):
                p.grad = g[i].clone()
            ref.step()
    assert_members_equal(stacked, members)


def test_parameters_without_grad_are_skipped_and_zero_grad_works():
    stacked = stack(make_members())
    opt = optim.AdamW(stacked, lr=0.1)
    before = stacked[1].detach().clone()
    stacked[0].grad = torch.randn_like(stacked[0])
    opt.step()
    assert torch.equal(stacked[1], before)
    assert stacked[1] not in opt.state
    opt.zero_grad()
    assert stacked[0].grad is None


def test_state_dict_round_trip_continues_identically():
    def fresh():
        torch.manual_seed(1)
        stacked = stack(make_members())
        return stacked, optim.AdamW(stacked, lr=[1e-2, 2e-2, 3e-2, 4e-2], weight_decay=[0.1, 0, 0, 0.2])

    grads = [[torch.randn_like(p) for p in fresh()[0]] for _ in range(4)]

    def take_step(stacked, opt, g):
        for p, gi in zip(stacked, g):
            p.grad = gi.clone()
        opt.step()

    a, opt_a = fresh()
    opt_a.freeze(3)
    for g in grads:
        take_step(a, opt_a, g)

    b, opt_b = fresh()
    opt_b.freeze(3)
    for g in grads[:2]:
        take_step(b, opt_b, g)
    saved = opt_b.state_dict()
    assert saved["frozen_members"] == [3]
    c = [p.detach().clone().requires_grad_() for p in b]
    opt_c = optim.AdamW(c, lr=0.5)
    opt_c.load_state_dict(saved)
    assert opt_c.frozen_members == [3]
    assert opt_c.param_groups[0]["lr"] == [1e-2, 2e-2, 3e-2, 4e-2]
    for g in grads[2:]:
        take_step(c, opt_c, g)
    for pa, pc in zip(a, c):
        assert torch.equal(pa, pc)


def test_works_on_torch_func_stack_module_state():
    modules = [torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)) for _ in range(N)]
    params, _ = torch.func.stack_module_state(modules)
    opt = optim.SGD(params.values(), lr=[0.1, 0.2, 0.3, 0.4], momentum=0.9)
    x = torch.randn(N, 5, 3)
    base = modules[0]

    def loss_fn(p, xi):
        return torch.func.functional_call(base, p, (xi,)).square().sum()

    loss = torch.vmap(loss_fn)(params, x).sum()
    loss.backward()
    opt.step()
    refs = [torch.optim.SGD(m.parameters(), lr=0.1 * (i + 1), momentum=0.9) for i, m in enumerate(modules)]
    for i, (m, ref) in enumerate(zip(modules, refs)):
        m(x[i]).square().sum().backward()
        ref.step()
        for name, p in m.named_parameters():
            torch.testing.assert_close(params[name][i], p, rtol=1.3e-6, atol=1e-6)


def test_update_has_no_python_loop_over_members(monkeypatch):
    """The number of torch ops per step must not grow with N (counted with a dispatch mode). The CPU's cache
    blocking (chunks of CPU_CHUNK_ELEMENTS) splits by size, not by member: off here."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(optim, "CPU_CHUNK_ELEMENTS", 1 << 40)

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for n in (2, 16):
        stacked = stack(make_members(n))
        opt = optim.AdamW(stacked, lr=[1e-3] * n, weight_decay=[0.1] * n)
        for p in stacked:
            p.grad = torch.randn_like(p)
        opt.step()  # creates the state
        with CountOps() as counter:
            opt.step()
        counts.append(counter.count)
    assert counts[0] == counts[1]


def test_errors_name_the_problem():
    stacked = stack(make_members())
    with pytest.raises(ValueError, match=r"lr has 3 values, but the ensemble has 4 members"):
        optim.SGD(stacked, lr=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"betas\[1\] has 2 values"):
        optim.AdamW(stacked, betas=(0.9, [0.99, 0.9]))
    with pytest.raises(ValueError, match=r"member 2: weight_decay=-1.0"):
        optim.AdamW(stacked, weight_decay=[0.0, 0.1, -1.0, 0.0])
    with pytest.raises(ValueError, match=r"parameter 1 of param group 0 has shape \(3, 2\): dim 0 must be the "
                                         r"member index of size 4"):
        optim.SGD([stacked[0], torch.zeros(3, 2, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match=r"parameter 'b' of param group 0 has shape \(\)"):
        optim.SGD([("a", stacked[0]), ("b", torch.zeros((), requires_grad=True))], lr=0.1)
    with pytest.raises(ValueError, match="nesterov needs momentum > 0"):
        optim.SGD(stacked, lr=0.1, momentum=[0.9, 0.9, 0.0, 0.9], nesterov=True)
    with pytest.raises(TypeError, match="lr must be a number or a sequence"):
        optim.SGD(stacked, lr="fast")
    with pytest.raises(IndexError, match="member 4 is out of range for an ensemble of 4 members"):
        optim.SGD(stacked, lr=0.1).freeze(4)
    opt = optim.SGD(stacked, lr=0.1)
    opt.param_groups[0]["lr"] = [0.1] * 5  # e.g. a scheduler for the wrong ensemble
    before = [p.detach().clone() for p in stacked]
    for p in stacked:
        p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match="lr has 5 values"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(stacked, before))  # nothing half-updated


@pytest.mark.parametrize("make", [
    lambda params: optim.SGD(params, lr=[0.1, 0.05, 0.2], momentum=[0.9, 0.0, 0.5], weight_decay=[1e-2, 0, 1e-3],
                             fused=False),
    lambda params: optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2, fused=False),
    lambda params: optim.AdamW(params, lr=[1e-3, 3e-3, 1e-2], weight_decay=[0.1, 0.0, 0.01], amsgrad=True,
                               fused=False),
    lambda params: optim.Adam(params, lr=[1e-3, 3e-3, 1e-2], weight_decay=[0.1, 0.0, 0.01], amsgrad=True,
                              fused=False),
], ids=["sgd", "sgd_nesterov", "adamw_amsgrad", "adam_amsgrad_l2"])
def test_cpu_chunked_update_is_bitwise_the_whole_update(monkeypatch, make):
    # Chunks of 7 elements cut parameters into single-member slices and pack small ones together; the
    # arithmetic per element must not change at all.
    torch.manual_seed(0)
    shapes = [(3, 5, 4), (3, 2), (3, 1), (3, 40), (3, 3, 3, 2)]
    runs = []
    for chunk in (1 << 40, 7):
        monkeypatch.setattr(optim, "CPU_CHUNK_ELEMENTS", chunk)
        torch.manual_seed(1)
        params = [torch.randn(shape, requires_grad=True) for shape in shapes]
        opt = make(params)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        states = [t for p in params for _, t in optim._state_tensors(opt.state[p])]
        runs.append([p.detach().clone() for p in params] + states)
    for whole, chunked in zip(*runs):
        assert torch.equal(whole, chunked)


@pytest.mark.parametrize("op", ["member_sgd_", "member_adamw_"])
def test_cpp_kernel_schemas_declare_what_they_mutate(op):
    if not load_extension():
        pytest.skip(f"the C++ extension is {extension_status()}")
    torch.manual_seed(0)
    params = [torch.randn(N, 3, 2, dtype=torch.float64), torch.randn(N, 5, dtype=torch.float64)]
    grads = [torch.randn_like(p) for p in params]
    states = [[torch.rand_like(p) for p in params] for _ in range(3)]
    if op == "member_sgd_":
        factors = torch.tensor([-0.1, 0.01, 0.9, 0.8, 0.0, 1.0], dtype=torch.float64).expand(2, N, 6).contiguous()
        args = (params, grads, states[0], factors, True)
    else:
        factors = torch.tensor([0.99, 0.1, 0.999, 1e-3, 0.5, 1e-8, -0.01, 1.0],
                               dtype=torch.float64).expand(2, N, 8).contiguous()
        args = (params, grads, *states, factors)
    torch.library.opcheck(getattr(torch.ops.fused_ensemble_ext, op), args, test_utils=("test_schema",))


def test_cpp_kernels_reject_mismatched_inputs():
    if not load_extension():
        pytest.skip(f"the C++ extension is {extension_status()}")
    params = [torch.randn(N, 3)]
    factors = torch.zeros(1, N, 6, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="grads\\[0\\] must be a CPU tensor of the parameter's shape"):
        torch.ops.fused_ensemble_ext.member_sgd_(params, [torch.randn(N, 4)], [], factors, False)
    with pytest.raises(RuntimeError, match=r"grads\[0\] must be a CPU tensor of the parameter's shape \[4, 3\], "
                                           r"strides \[3, 1\]"):
        torch.ops.fused_ensemble_ext.member_sgd_(params, [torch.randn(3, N).t()], [], factors, False)
    with pytest.raises(RuntimeError, match="parameter 0 must be a dense CPU Float tensor with 4 members in dim 0, "
                                           "outermost in memory"):
        torch.ops.fused_ensemble_ext.member_sgd_([torch.randn(3, N).t()], [torch.randn(3, N).t()], [], factors,
                                                 False)
    with pytest.raises(RuntimeError, match="factors must be a contiguous float64 CPU tensor of shape \\[1, 4, 6\\]"):
        torch.ops.fused_ensemble_ext.member_sgd_(params, [torch.randn(N, 3)], [], factors[:, :, :5], False)
    momentum = factors.clone()
    momentum[0, :, 2] = 0.9
    momentum[0, :, 5] = 1.0
    with pytest.raises(RuntimeError, match="momentum but no momentum buffers"):
        torch.ops.fused_ensemble_ext.member_sgd_(params, [torch.randn(N, 3)], [], momentum, False)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.fused_ensemble_ext.member_sgd_([params[0].half()], [torch.randn(N, 3).half()], [], factors, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cls, torch_cls, kwargs", [
    (optim.SGD, torch.optim.SGD, dict(lr=[0.1, 0.05, 0.2], momentum=[0.9, 0.0, 0.5], weight_decay=[1e-2, 0.0, 1e-3],
                                      nesterov=False)),
    (optim.AdamW, torch.optim.AdamW, dict(lr=[1e-2, 3e-3, 1e-3], weight_decay=[0.1, 0.0, 0.01], amsgrad=True)),
    (optim.Adam, torch.optim.Adam, dict(lr=[1e-2, 3e-3, 1e-3], weight_decay=[0.1, 0.0, 0.01], amsgrad=True)),
], ids=["sgd", "adamw", "adam"])
def test_cpp_kernels_on_slices_longer_than_a_task(cls, torch_cls, kwargs, dtype):
    # Member slices of 40000 elements span three tasks of the C++ kernel (2^14 elements each, the last one
    # partial), next to a parameter smaller than one task; member 1 is frozen for one step.
    torch.manual_seed(0)
    shapes = [(3, 200, 200), (3, 7)]
    stacked = [torch.randn(shape, dtype=dtype, requires_grad=True) for shape in shapes]
    members = [[p[i].detach().clone().requires_grad_() for p in stacked] for i in range(3)]
    stacked, members, _, _ = run_both(
        cls, torch_cls, kwargs, lambda i: {k: (v[i] if isinstance(v, list) else v) for k, v in kwargs.items()},
        steps=3, frozen_steps={1: [1]}, members=members, stacked=stacked)
    tolerance = dict(rtol=1.3e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for j, p in enumerate(stacked):
        for i in range(3):
            torch.testing.assert_close(p[i], members[i][j], **tolerance)
