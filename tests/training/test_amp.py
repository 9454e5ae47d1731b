"""MemberGradScaler against one torch.amp.GradScaler per member alone (on the CPU: the scaling logic is the same
on every device), on hand-made stacked parameters; the FusedEnsemble case is in tests/test_train.py."""

import pytest
import torch

from fused_ensemble import optim
from fused_ensemble.training.amp import MemberGradScaler

N = 3
SHAPES = [(4, 3), (4,), (2, 3, 3, 3)]
INIT_SCALES = [2.0**16, 2.0**127, 1.0]  # the second one cannot grow (2**128 is inf in float32) and overflows
OVERFLOWS = {1: [0], 3: [0, 2], 4: [0]}  # step -> members whose loss is inf at that step


def loss_weights(step, generator):
    """Per member and parameter, the weights w of the loss sum(w * p): its gradient is w (times the scale)."""
    weights = [torch.randn(N, *s, generator=generator) for s in SHAPES]
    for member in OVERFLOWS.get(step, []):
        weights[0][member, 0, 0] = float("inf")
    return weights


def stacked_loss(stacked, weights):
    """[N]: member i's loss from its slices."""
    return sum((p * w).flatten(1).sum(1) if p.dim() > 1 else p * w for p, w in zip(stacked, weights))


@pytest.mark.parametrize("make", [
    (lambda ps: optim.SGD(ps, lr=[0.1, 0.05, 0.2], momentum=0.9), lambda ps, i: torch.optim.SGD(
        ps, lr=[0.1, 0.05, 0.2][i], momentum=0.9)),
    (lambda ps: optim.AdamW(ps, lr=1e-2), lambda ps, i: torch.optim.AdamW(ps, lr=1e-2)),
], ids=["sgd_momentum", "adamw"])
@pytest.mark.parametrize("unscale_first", [False, True], ids=["step_unscales", "unscale_then_step"])
def test_each_member_scales_skips_and_steps_as_alone(make, unscale_first):
    make_fused, make_torch = make
    generator = torch.Generator().manual_seed(0)
    members = [[torch.randn(s, generator=generator).requires_grad_() for s in SHAPES] for _ in range(N)]
    stacked = [torch.stack([m[j].detach() for m in members]).requires_grad_() for j in range(len(SHAPES))]
    fused_opt = make_fused(stacked)
    scaler = MemberGradScaler(N, "cpu", init_scale=INIT_SCALES, growth_interval=2)
    torch_opts = [make_torch(m, i) for i, m in enumerate(members)]
    torch_scalers = [torch.amp.GradScaler("cpu", init_scale=s, growth_interval=2) for s in INIT_SCALES]
    skipped = torch.zeros(N, dtype=torch.int64)
    for step in range(6):
        weights = loss_weights(step, generator)
        fused_opt.zero_grad()
        scaler.scale(stacked_loss(stacked, weights)).sum().backward()
        if unscale_first:
            scaler.unscale_(fused_opt)
        scaler.step(fused_opt)
        scaler.update()
        for i, (m, opt, torch_scaler) in enumerate(zip(members, torch_opts, torch_scalers)):
            opt.zero_grad()
            loss = sum((p * w[i]).sum() for p, w in zip(m, weights))
            torch_scaler.scale(loss).backward()
            if unscale_first:
                torch_scaler.unscale_(opt)
            before = torch_scaler.get_scale()
            torch_scaler.step(opt)
            torch_scaler.update()
            skipped[i] += torch_scaler.get_scale() < before
        expected_scales = torch.tensor([s.get_scale() for s in torch_scalers])
        assert torch.equal(scaler.get_scale(), expected_scales), f"step {step}"
        for j, p in enumerate(stacked):
            for i, m in enumerate(members):
                torch.testing.assert_close(p[i], m[j], rtol=1e-6, atol=1e-7,
                                           msg=lambda s: f"step {step}, member {i}, parameter {j}: {s}")
    # Members 0 and 2 overflow where told to; member 1's scale of 2**127 overflows its gradients by itself.
    assert skipped[0] == 3 and skipped[2] == 1 and skipped[1] >= 1, skipped


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_an_overflowing_member_leaves_the_others_stepping(device):
    stacked = [torch.ones(N, 2, requires_grad=True, device=device)]
    opt = optim.SGD(stacked, lr=0.5)
    scaler = MemberGradScaler(N, device, init_scale=4.0, growth_interval=1)
    weights = torch.tensor([[1.0, 1.0], [float("inf"), 1.0], [2.0, 2.0]], device=device)
    scaler.scale((stacked[0] * weights).sum(1)).sum().backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(stacked[0].detach().cpu(), torch.tensor([[0.5, 0.5], [1.0, 1.0], [0.0, 0.0]]))
    assert scaler.get_scale().tolist() == [8.0, 2.0, 8.0]


def test_state_dict_round_trip_and_disabled_scaler():
    scaler = MemberGradScaler(N, "cpu", init_scale=[1.0, 2.0, 4.0], growth_interval=3)
    stacked = [torch.ones(N, 2, requires_grad=True)]
    opt = optim.SGD(stacked, lr=0.1)
    scaler.scale(stacked[0].sum(1)).sum().backward()
    scaler.step(opt)
    scaler.update()
    restored = MemberGradScaler(N, "cpu")
    restored.load_state_dict(scaler.state_dict())
    assert restored.state_dict() == scaler.state_dict()
    assert restored.state_dict()["_growth_tracker"] == [1, 1, 1]
    with pytest.raises(ValueError, match="holds 3 members' scales, this scaler has 2"):
        MemberGradScaler(2, "cpu").load_state_dict(scaler.state_dict())

    off = MemberGradScaler(N, "cpu", enabled=False)
    losses = torch.ones(N)
    assert off.scale(losses) is losses and off.state_dict() == {} and torch.equal(off.get_scale(), torch.ones(N))
    off.unscale_(opt)
    off.step(opt)
    off.update()


def test_misuse_raises_clear_errors():
    stacked = [torch.ones(N, 2, requires_grad=True)]
    opt = optim.SGD(stacked, lr=0.1)
    scaler = MemberGradScaler(N, "cpu")
    with pytest.raises(ValueError, match="summed over members cannot be scaled per member"):
        scaler.scale(torch.tensor(1.0))
    with pytest.raises(RuntimeError, match="no inf checks were recorded"):
        scaler.update()
    scaler.scale(stacked[0].sum(1)).sum().backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.unscale_(opt)
    scaler.step(opt)
    with pytest.raises(RuntimeError, match="step\\(\\) has already been called"):
        scaler.step(opt)
    scaler.update()
    with pytest.raises(TypeError, match="needs a fused_ensemble.optim optimizer"):
        scaler.step(torch.optim.SGD(stacked, lr=0.1))
    half = [torch.ones(N, 2, dtype=torch.float16, requires_grad=True)]
    half[0].grad = torch.ones_like(half[0])
    with pytest.raises(ValueError, match="float16 gradients"):
        scaler.unscale_(optim.SGD(half, lr=0.1))
    for bad in (dict(init_scale=[1.0, 0.0, 1.0]), dict(growth_factor=1.0), dict(backoff_factor=1.0),
                dict(growth_interval=0)):
        with pytest.raises(ValueError):
            MemberGradScaler(N, "cpu", **bad)


@pytest.mark.parametrize("fused", [None, False], ids=["cpp_kernels", "foreach"])
def test_optimizer_skip_members_is_a_one_step_freeze(fused):
    stacked = [torch.ones(N, 2, requires_grad=True)]
    opt = optim.AdamW(stacked, lr=0.1, fused=fused)
    stacked[0].grad = torch.ones(N, 2)
    opt.step(skip_members=[1])
    opt.step(skip_members=torch.tensor([False, False, True]))
    assert opt.state[stacked[0]]["step"].tolist() == [2.0, 1.0, 1.0]
    p = stacked[0].detach()
    assert torch.equal(p[1], p[2]) and not torch.equal(p[0], p[1])  # one step each, the same one
    assert opt.frozen_members == []
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        opt.step(skip_members=torch.tensor([True, False]))
