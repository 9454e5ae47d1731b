"""FusedEnsemble in train mode against the member loop: BatchNorm running statistics, parameter gradients,
dropout, and a few optimizer steps."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from fused_ensemble import FusedEnsemble
from fused_ensemble.cli.models import MLP, CifarResNet18, LeNet5

from member_factories import assert_grads_match, assert_matches, assert_state_equal, make_members, member_loop

# Small members of the real architectures (narrow widths keep the CPU tests fast; the fusion is the same):
# name -> (factory, sample shape, dtype of the train-mode comparisons).
# MobileNetV2 in train mode runs in float64: with random weights and a batch of 3, its 17 batch-statistics
# BatchNorms make it so ill-conditioned that the fp32 member loop itself is off by 2e-3 in the output and up to
# 37% in some gradients against the fp64 loop (the fused network is as close); fp32 cannot resolve 1e-5 there.
FACTORIES = {
    "mlp": (lambda: MLP(in_features=20, hidden=16, dropout=0.0), (20,), torch.float32),
    "lenet": (LeNet5, (1, 28, 28), torch.float32),
    "resnet18-cifar": (lambda: CifarResNet18(width=8), (3, 16, 16), torch.float32),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(width_mult=0.25, num_classes=10, dropout=0.0),
                     (3, 32, 32), torch.float64),
}


def train_members(name: str, n: int, seed: int, training: bool = True):
    """Members of ``FACTORIES[name]`` (in its train-mode dtype when ``training``), their sample shape, dtype."""
    factory, shape, dtype = FACTORIES[name]
    dtype = dtype if training else torch.float32
    return [m.to(dtype) for m in make_members(factory, n=n, seed=seed, training=training)], shape, dtype


def draw_batch(shape, n: int, member_inputs: bool, batch: int = 3, dtype=torch.float32):
    lead = (n, batch) if member_inputs else (batch,)
    return torch.randn(*lead, *shape, dtype=dtype), torch.randint(0, 10, lead)


def assert_buffers_match_loop(fused: FusedEnsemble, members) -> None:
    """Running statistics equal the loop's to fp32 rounding; the batch counters exactly."""
    for index, (unfused, member) in enumerate(zip(fused.to_members(), members)):
        ours, theirs = dict(unfused.named_buffers()), dict(member.named_buffers())
        assert list(ours) == list(theirs)
        for name, expected in theirs.items():
            if expected.is_floating_point():
                torch.testing.assert_close(ours[name], expected, rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"member {index}: {name}: {m}")
            else:
                assert torch.equal(ours[name], expected), f"member {index}: {name} {ours[name]} != {expected}"


@pytest.mark.parametrize("member_inputs", [False, True], ids=["shared", "member_inputs"])
@pytest.mark.parametrize("name", ["mlp", "resnet18-cifar", "mobilenet_v2"])
def test_batch_norm_running_stats_update_as_in_the_loop(name, member_inputs):
    members, shape, dtype = train_members(name, n=3, seed=21)
    before = [dict((k, v.clone()) for k, v in m.named_buffers()) for m in members]
    fused = FusedEnsemble(copy.deepcopy(members), reduction="none", member_inputs=member_inputs)
    assert fused.training
    with torch.no_grad():
        for _ in range(3):
            x, _ = draw_batch(shape, 3, member_inputs, dtype=dtype)
            assert_matches(fused(x), member_loop(members, x, member_inputs))
    assert_buffers_match_loop(fused, members)
    for member, old in zip(members, before):  # the loop really moved the statistics
        assert all(not torch.equal(b, old[k]) for k, b in member.named_buffers())
    # Parameters are untouched by forward passes.
    for unfused, member in zip(fused.to_members(), members):
        assert all(torch.equal(p, q) for p, q in zip(unfused.parameters(), member.parameters()))


@pytest.mark.parametrize("momentum", [None, 0.5])
def test_batch_norm_momentum_variants_in_train_mode(momentum):
    def factory():
        return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, momentum=momentum), nn.ReLU(),
                             nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False, track_running_stats=False))
    members = make_members(factory, n=2, seed=22, training=True)
    fused = FusedEnsemble(copy.deepcopy(members), reduction="none")
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(4, 2, 5, 5)
            assert_matches(fused(x), member_loop(members, x))
    assert_buffers_match_loop(fused, members)
    fused.eval()
    for member in members:
        member.eval()
    x = torch.randn(2, 2, 5, 5)
    with torch.no_grad():
        assert_matches(fused(x), member_loop(members, x))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("member_inputs", [False, True], ids=["shared", "member_inputs"])
@pytest.mark.parametrize("name", ["mlp", "lenet", "resnet18-cifar", "mobilenet_v2"])
def test_gradients_equal_the_loop(name, member_inputs, training):
    """Sum of the member losses: member i's gradients are the i-th slices of the fused gradients."""
    members, shape, dtype = train_members(name, n=2, seed=23, training=training)
    fused = FusedEnsemble(copy.deepcopy(members), reduction="none", member_inputs=member_inputs)
    x, y = draw_batch(shape, 2, member_inputs, dtype=dtype)
    targets = y if member_inputs else y.expand(2, -1)
    out = fused(x)
    sum(F.cross_entropy(out[i], targets[i]) for i in range(2)).backward()
    sum(F.cross_entropy(m(x[i] if member_inputs else x), targets[i]) for i, m in enumerate(members)).backward()
    assert_grads_match(fused, members)


def test_gradient_through_a_reduction_equals_the_loop():
    """The ensemble loss (NLL of the log of the mean member probability) back to every member's weights."""
    members, shape, _ = train_members("lenet", n=3, seed=24)
    fused = FusedEnsemble(copy.deepcopy(members), reduction="log_mean_probs")
    x, y = draw_batch(shape, 3, False)
    F.nll_loss(fused(x), y).backward()
    log_probs = torch.logsumexp(torch.log_softmax(member_loop(members, x), -1), 0) - torch.log(torch.tensor(3.0))
    F.nll_loss(log_probs, y).backward()
    assert_grads_match(fused, members)


def test_dropout_gives_each_member_its_own_mask():
    """Members with identical weights: in train mode only dropout tells them apart, and it must."""
    member = MLP(in_features=20, hidden=64, dropout=0.5).train()
    fused = FusedEnsemble([copy.deepcopy(member) for _ in range(3)], reduction="none")
    x = torch.randn(4, 20)
    with torch.no_grad():
        out = fused(x)
        for i in range(3):
            for j in range(i):
                assert not torch.allclose(out[i], out[j]), f"members {i} and {j} drew the same dropout mask"
        fused.eval()
        out = fused(x)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


@pytest.mark.parametrize("member_inputs", [False, True], ids=["shared", "member_inputs"])
def test_sgd_steps_track_the_loop(member_inputs):
    """A few SGD steps (momentum, weight decay) on the fused module and on each member: same weights after."""
    members, shape, _ = train_members("resnet18-cifar", n=2, seed=25)
    fused = FusedEnsemble(copy.deepcopy(members), reduction="none", member_inputs=member_inputs)
    fused_optimizer = torch.optim.SGD(fused.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3) for m in members]
    for _ in range(3):
        x, y = draw_batch(shape, 2, member_inputs)
        targets = y if member_inputs else y.expand(2, -1)
        out = fused(x)
        fused_optimizer.zero_grad()
        sum(F.cross_entropy(out[i], targets[i]) for i in range(2)).backward()
        fused_optimizer.step()
        for i, (member, optimizer) in enumerate(zip(members, optimizers)):
            optimizer.zero_grad()
            F.cross_entropy(member(x[i] if member_inputs else x), targets[i]).backward()
            optimizer.step()
    for index, (unfused, member) in enumerate(zip(fused.to_members(), members)):
        for (name, ours), theirs in zip(unfused.state_dict().items(), member.state_dict().values()):
            if ours.is_floating_point():
                torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5,
                                           msg=lambda m: f"member {index}: {name}: {m}")
            else:
                assert torch.equal(ours, theirs), f"member {index}: {name}"
        assert_state_equal(unfused.state_dict(), {k: v[index] for k, v in
                                                  ((k[len("stacked."):], v) for k, v in fused.state_dict().items())})


@pytest.mark.slow
def test_compiled_training_matches_eager_and_compiles_before_any_eager_forward(monkeypatch):
    """torch.compile(fullgraph=True) of a training step's forward and loss: same loss, gradients and BatchNorm
    statistics as eager over a few SGD steps. The compiled call comes first in a process where the CPU allocator
    setting has not been made yet (a ctypes call that dynamo cannot trace: the forward skips it while compiling)."""
    import dataclasses

    from fused_ensemble import config, cpu_memory, optim

    # The setting is opt-in: turn it on, so that the eager forward makes it.
    monkeypatch.setattr(config, "settings", dataclasses.replace(config.settings, keep_cpu_memory=True))
    monkeypatch.setattr(cpu_memory, "_cpu_memory_settled", False)
    monkeypatch.setattr(cpu_memory, "_mallopt", lambda parameter, value: True)

    def member():
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))

    members = make_members(member, n=3, seed=31, training=True)
    eager = FusedEnsemble(copy.deepcopy(members), reduction="none", member_inputs=True)
    compiled_fused = FusedEnsemble(copy.deepcopy(members), reduction="none", member_inputs=True)

    def loss_of(model, x, y):
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum")

    torch._dynamo.reset()
    compiled_loss = torch.compile(loss_of, fullgraph=True)
    optimizers = [optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (eager, compiled_fused)]
    for step in range(3):
        x, y = torch.randn(3, 6, 3, 8, 8), torch.randint(0, 5, (3, 6))
        losses = []
        for model, loss_fn, opt in ((compiled_fused, compiled_loss, optimizers[1]), (eager, loss_of, optimizers[0])):
            opt.zero_grad()
            loss = loss_fn(model, x, y)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5, msg=lambda m: f"step {step}: {m}")
    assert cpu_memory.settled()  # by the eager forward, not the compiled one
    for (name, ours), theirs in zip(compiled_fused.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_activation_checkpointing_gives_the_loops_gradients(use_reentrant):
    # Non-reentrant checkpointing stops the recomputed forward by raising inside the reduction op's autograd setup;
    # backend="auto"'s kernel fallback once swallowed that (recomputation then failed, and the C++ kernels were
    # dropped for the process with a warning).
    from torch.utils.checkpoint import checkpoint

    members, shape, _ = train_members("resnet18-cifar", n=3, seed=40)
    fused = FusedEnsemble(copy.deepcopy(members), reduction="log_mean_probs")
    x = torch.randn(4, *shape, requires_grad=True)
    y = torch.tensor([1, 0, 3, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        loss = F.nll_loss(checkpoint(fused, x, use_reentrant=use_reentrant), y)
        loss.backward()  # reentrant checkpointing does not support autograd.grad
    grads = [x.grad] + [p.grad for p in fused.parameters()]
    log_probs = torch.stack([F.log_softmax(m(x), -1) for m in members])
    expected_loss = F.nll_loss(torch.logsumexp(log_probs, 0) - math.log(len(members)), y)
    names = [name.removeprefix("stacked.") for name, _ in fused.named_parameters()]
    expected = torch.autograd.grad(expected_loss, [x] + [m.get_parameter(n) for n in names for m in members])
    assert_matches(loss, expected_loss)
    assert_matches(grads[0], expected[0])
    for index, grad in enumerate(grads[1:]):
        assert_matches(grad, torch.stack(expected[1 + index * 3:1 + (index + 1) * 3]))
