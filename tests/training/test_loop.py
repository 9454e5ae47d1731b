"""Fused training is N independent trainings: exactness against torch.optim per member, and the train command."""

import argparse
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fused_ensemble import FusedEnsemble, member_cross_entropy, optim, train_epoch
from fused_ensemble.cli.train import add_train_arguments, run_train
from fused_ensemble.training.amp import MemberGradScaler
from fused_ensemble.training.clip_grad import clip_grad_norm_

N, B, STEPS = 3, 6, 3
LR_SGD, LR_ADAMW = [0.1, 0.03, 0.3], [1e-2, 3e-3, 3e-2]
WEIGHT_DECAY = [0.0, 1e-2, 0.1]


def cnn_with_batchnorm():
    # No conv bias before BatchNorm: its true gradient is 0, and AdamW would turn rounding noise of 1e-9 into
    # full-size steps, in either implementation.
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 5))


def mlp_with_dropout_disabled():
    # p=0: dropout layers fused and run, but draw no masks, so the member runs are deterministic.
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Dropout(0.0), nn.Linear(16, 16), nn.GELU(),
                         nn.Dropout(0.0), nn.Linear(16, 5))


def make_members(build):
    members = [build() for _ in range(N)]
    for m in members:  # random running statistics, so their updates are checked on non-trivial values
        for module in m.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    return members


OPTIMIZERS = {
    "sgd": (lambda params: optim.SGD(params, lr=LR_SGD, momentum=[0.9, 0.5, 0.0], weight_decay=WEIGHT_DECAY),
            lambda params, i: torch.optim.SGD(params, lr=LR_SGD[i], momentum=[0.9, 0.5, 0.0][i],
                                              weight_decay=WEIGHT_DECAY[i])),
    "adamw": (lambda params: optim.AdamW(params, lr=LR_ADAMW, weight_decay=WEIGHT_DECAY, betas=([0.9, 0.8, 0.5], 0.99)),
              lambda params, i: torch.optim.AdamW(params, lr=LR_ADAMW[i], weight_decay=WEIGHT_DECAY[i],
                                                  betas=([0.9, 0.8, 0.5][i], 0.99))),
    "adam": (lambda params: optim.Adam(params, lr=LR_ADAMW, weight_decay=WEIGHT_DECAY, amsgrad=True),
             lambda params, i: torch.optim.Adam(params, lr=LR_ADAMW[i], weight_decay=WEIGHT_DECAY[i], amsgrad=True)),
}


def fused_and_alone(build, optimizer):
    """N members of ``build`` fused (train mode) with the fused optimizer, and copies of them with one torch
    optimizer each: (fused, fused optimizer, members alone, their optimizers)."""
    make_fused_opt, make_member_opt = OPTIMIZERS[optimizer]
    members = make_members(build)
    alone = [copy.deepcopy(m).train() for m in members]
    fused = FusedEnsemble(members, reduction="none", member_inputs=True).train()
    return (fused, make_fused_opt(fused.parameters()), alone,
            [make_member_opt(m.parameters(), i) for i, m in enumerate(alone)])


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("build", [cnn_with_batchnorm, mlp_with_dropout_disabled])
def test_fused_training_equals_each_member_trained_alone(build, optimizer):
    fused, fused_opt, alone, member_opts = fused_and_alone(build, optimizer)
    for _ in range(STEPS):
        train_both(fused, fused_opt, alone, member_opts)
    assert_members_equal(fused, alone)


def train_both(fused, fused_opt, alone, member_opts):
    """One step on a fresh random batch: the fused ensemble, and each member alone with its own optimizer."""
    x, y = torch.randn(N, B, 1, 8, 8), torch.randint(0, 5, (N, B))
    fused_opt.zero_grad()
    member_cross_entropy(fused(x), y).backward()
    fused_opt.step()
    for i, (m, opt) in enumerate(zip(alone, member_opts)):
        opt.zero_grad()
        F.cross_entropy(m(x[i]), y[i]).backward()
        opt.step()


def assert_members_equal(fused, alone):
    for i, (got, expected) in enumerate(zip(fused.to_members(), alone)):
        got_state, expected_state = got.state_dict(), expected.state_dict()
        assert list(got_state) == list(expected_state)
        for name in expected_state:
            torch.testing.assert_close(got_state[name], expected_state[name], rtol=1e-5, atol=1e-5,
                                       msg=lambda s: f"member {i}, {name}: {s}")


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_per_member_gradient_clipping_equals_each_member_clipped_alone(optimizer):
    max_norm = [0.05, 1.0, 100.0]  # the first clips at every step, the last never
    fused, fused_opt, alone, member_opts = fused_and_alone(cnn_with_batchnorm, optimizer)
    for _ in range(STEPS):
        x, y = torch.randn(N, B, 1, 8, 8), torch.randint(0, 5, (N, B))
        fused_opt.zero_grad()
        member_cross_entropy(fused(x), y).backward()
        norms = clip_grad_norm_(fused.parameters(), max_norm)
        fused_opt.step()
        for i, (m, opt) in enumerate(zip(alone, member_opts)):
            opt.zero_grad()
            F.cross_entropy(m(x[i]), y[i]).backward()
            torch.testing.assert_close(norms[i], torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm[i]),
                                       rtol=1e-5, atol=0)
            opt.step()
        assert norms[0] > max_norm[0] and norms[2] < max_norm[2]
    assert_members_equal(fused, alone)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_member_grad_scaler_equals_each_member_with_its_own_grad_scaler(optimizer):
    """Member 1's input is inf at step 1: it alone skips that step and backs off; the others grow their scales.
    (No BatchNorm: an inf batch would poison running statistics, in both trainings alike.)"""
    fused, fused_opt, alone, member_opts = fused_and_alone(mlp_with_dropout_disabled, optimizer)
    scaler = MemberGradScaler(N, "cpu", init_scale=2.0**10, growth_interval=2)
    member_scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2) for _ in alone]
    for step in range(4):
        x, y = torch.randn(N, B, 1, 8, 8), torch.randint(0, 5, (N, B))
        if step == 1:
            x[1, 0, 0, 0, 0] = float("inf")
        fused_opt.zero_grad()
        scaler.scale(member_cross_entropy(fused(x), y, reduction="none")).sum().backward()
        scaler.step(fused_opt)
        scaler.update()
        for i, (m, opt, member_scaler) in enumerate(zip(alone, member_opts, member_scalers)):
            opt.zero_grad()
            member_scaler.scale(F.cross_entropy(m(x[i]), y[i])).backward()
            member_scaler.step(opt)
            member_scaler.update()
    assert scaler.get_scale().tolist() == [s.get_scale() for s in member_scalers] == [2.0**12, 2.0**10, 2.0**12]
    assert_members_equal(fused, alone)


def test_frozen_member_stays_bitwise_through_fused_training():
    members = make_members(cnn_with_batchnorm)
    fused = FusedEnsemble(members, reduction="none", member_inputs=True)
    opt = optim.SGD(fused.parameters(), lr=0.1, momentum=0.9)
    opt.freeze(1)
    before = {k: v.clone() for k, v in fused.to_members()[1].named_parameters()}
    x, y = torch.randn(N * 40, 1, 8, 8), torch.randint(0, 5, (N * 40,))
    train_epoch(fused, opt, x, y, batch_size=16, generator=torch.Generator().manual_seed(0))
    after = fused.to_members()
    for name, p in after[1].named_parameters():
        assert torch.equal(p, before[name]), name
    assert not torch.equal(after[0][0].weight, members[0][0].weight)


def test_member_cross_entropy_takes_shared_or_per_member_targets():
    logits = torch.randn(N, B, 5, requires_grad=True)
    shared, own = torch.randint(0, 5, (B,)), torch.randint(0, 5, (N, B))
    for targets, member_targets in ((shared, [shared] * N), (own, list(own))):
        per_member = member_cross_entropy(logits, targets, reduction="none")
        expected = torch.stack([F.cross_entropy(logits[i], member_targets[i]) for i in range(N)])
        torch.testing.assert_close(per_member, expected, rtol=1.3e-6, atol=1e-7)
        torch.testing.assert_close(member_cross_entropy(logits, targets), expected.sum(), rtol=1.3e-6, atol=1e-6)
    # [B] labels are [N, B] labels repeated for every member: the same loss and the same gradients
    shared_grad, = torch.autograd.grad(member_cross_entropy(logits, shared), logits)
    repeated_grad, = torch.autograd.grad(member_cross_entropy(logits, shared.expand(N, B).clone()), logits)
    assert torch.equal(shared_grad, repeated_grad)


@pytest.mark.parametrize("shape", [(B + 1,), (N + 1, B), (N, B, 1), (), (B, N)])
def test_member_cross_entropy_names_both_target_shapes(shape):
    logits = torch.randn(N, B, 5)
    with pytest.raises(ValueError, match=rf"targets must be \[B\] = \[{B}\] \(the same labels for every member\) "
                                         rf"or \[N, B\] = \[{N}, {B}\] \(each member's own labels\)"):
        member_cross_entropy(logits, torch.zeros(shape, dtype=torch.long))
    with pytest.raises(ValueError, match=r"logits must be \[N, B, K\]"):
        member_cross_entropy(logits[0], torch.zeros(B, dtype=torch.long))


def test_train_epoch_needs_per_member_outputs():
    fused = FusedEnsemble(make_members(cnn_with_batchnorm), reduction="mean_probs", member_inputs=True)
    with pytest.raises(ValueError, match="reduction='none', member_inputs=True"):
        train_epoch(fused, optim.SGD(fused.parameters(), lr=0.1), torch.randn(8, 1, 8, 8),
                    torch.zeros(8, dtype=torch.long), batch_size=4)


def parse(argv):
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return parser.parse_args(argv)


def test_train_command_on_digits_end_to_end(tmp_path, capsys):
    json_path, plot_path = tmp_path / "summary.json", tmp_path / "reliability.png"
    summary = run_train(parse(["--dataset", "digits", "--members", "3", "--epochs", "1", "--batch-size", "32",
                               "--max-train", "640", "--max-test", "200", "--lr", "0.1", "0.05", "0.2",
                               "--no-progress", "--json", str(json_path), "--plot", str(plot_path)]))
    written = json.loads(json_path.read_text())
    for key in ("member_accuracy", "member_nll", "member_brier", "member_ece"):
        assert len(written[key]) == 3
    for key in ("ensemble_accuracy", "ensemble_nll", "ensemble_ece", "ensemble_brier", "train_member_images_per_s",
                "ensemble_pairwise_disagreement"):
        assert isinstance(written[key], float)
    assert written["lr"] == [0.1, 0.05, 0.2]
    assert written["train_steps"] == 640 // 32
    assert written == json.loads(json.dumps(summary))
    assert summary["ensemble_accuracy"] > 0.5  # 20 steps on digits; chance is 0.1
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| **ensemble** |" in capsys.readouterr().out


def test_train_command_on_a_tiny_cifar10_folder(tmp_path):
    from test_data import write_tiny_cifar10

    write_tiny_cifar10(tmp_path)
    summary = run_train(parse(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--no-verify-md5",
                               "--model", "small-cnn", "--members", "2", "--epochs", "1", "--batch-size", "4",
                               "--no-progress"]))
    assert summary["dataset"] == "cifar10" and summary["train_examples"] == 20 and summary["test_examples"] == 6
    assert summary["train_steps"] == 5 and len(summary["member_accuracy"]) == 2


@pytest.mark.parametrize("amp, optimizer", [("fp16", "sgd"), ("bf16", "adamw")])
def test_train_command_with_clipping_mixed_precision_and_adamw(amp, optimizer):
    # 40 steps: with the members seeded one by one, 20 steps of AdamW at its default lr left the ensemble near 0.5.
    summary = run_train(parse(["--dataset", "digits", "--members", "2", "--epochs", "1", "--batch-size", "32",
                               "--max-train", "1280", "--max-test", "200", "--clip-grad-norm", "1.0", "5.0",
                               "--amp", amp, "--optimizer", optimizer, "--device", "cpu", "--no-progress"]))
    assert summary["clip_grad_norm"] == [1.0, 5.0] and summary["amp"] == amp
    assert summary["optimizer"] == optimizer and summary["lr"] == ([0.1] if optimizer == "sgd" else [1e-3])
    if amp == "fp16":
        assert len(summary["loss_scale"]) == 2 and all(s > 0 for s in summary["loss_scale"])
    else:
        assert summary["loss_scale"] is None
    assert summary["ensemble_accuracy"] > 0.5


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_a_restarted_member_trains_as_a_fresh_model_and_the_others_go_on(optimizer):
    """set_member + reset_member mid-training: member 1 then trains exactly as a fresh model with a fresh torch
    optimizer would; members 0 and 2 as if nothing happened."""
    fused, fused_opt, alone, member_opts = fused_and_alone(cnn_with_batchnorm, optimizer)
    make_member_opt = OPTIMIZERS[optimizer][1]
    for _ in range(2):
        train_both(fused, fused_opt, alone, member_opts)
    fresh = make_members(cnn_with_batchnorm)[0].train()
    fused.set_member(1, fresh)
    fused_opt.reset_member(1)
    alone[1] = copy.deepcopy(fresh)
    member_opts[1] = make_member_opt(alone[1].parameters(), 1)
    for _ in range(2):
        train_both(fused, fused_opt, alone, member_opts)
    assert_members_equal(fused, alone)


def test_set_member_checks_the_architecture_and_index():
    fused = FusedEnsemble(make_members(cnn_with_batchnorm), reduction="none")
    before = fused.to_members()
    copy_of_0 = copy.deepcopy(before[0])
    fused.set_member(-1, copy_of_0)  # population-based training: member 2 takes member 0's weights
    after = fused.to_members()
    for name, tensor in after[2].state_dict().items():
        assert torch.equal(tensor, before[0].state_dict()[name]), name
        assert torch.equal(after[1].state_dict()[name], before[1].state_dict()[name]), name
    wider = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(6 * 4 * 4, 5))
    with pytest.raises(ValueError, match=r"member 1: the replacement's 0.weight is torch.float32 of shape "
                                         r"\(6, 1, 3, 3\), the members' are torch.float32 of shape \(4, 1, 3, 3\)"):
        fused.set_member(1, wider)
    with pytest.raises(IndexError, match="member 3 is out of range"):
        fused.set_member(3, copy_of_0)
    with pytest.raises(TypeError, match="the replacement is a Linear"):
        fused.set_member(0, nn.Linear(2, 2))
