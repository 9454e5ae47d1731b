"""Per-member schedules against torch.optim.lr_scheduler run once per member."""

import pytest
import torch

from fused_ensemble import lr_scheduler, optim

N = 3
BASE_LRS = [0.1, 0.03, 0.5]
EPOCHS = 25


def fused_lrs(optimizer_cls, make_scheduler, epochs=EPOCHS):
    """Per-member lr after construction and after each step, [epochs + 1][N]."""
    opt = optimizer_cls([torch.zeros(N, 2, requires_grad=True)], lr=BASE_LRS)
    scheduler = make_scheduler(opt)
    history = [list(opt.param_groups[0]["lr"])]
    for _ in range(epochs):
        opt.step()
        scheduler.step()
        history.append(list(opt.param_groups[0]["lr"]))
    assert scheduler.get_last_lr() == [history[-1]]
    return history


def torch_lrs(member, make_torch_scheduler, epochs=EPOCHS):
    opt = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=BASE_LRS[member])
    scheduler = make_torch_scheduler(opt, member)
    history = [opt.param_groups[0]["lr"]]
    for _ in range(epochs):
        opt.step()
        scheduler.step()
        history.append(opt.param_groups[0]["lr"])
    return history


T = torch.optim.lr_scheduler
CASES = {
    "step": (lambda o: lr_scheduler.StepLR(o, step_size=[3, 5, 1], gamma=[0.5, 0.1, 0.9]),
             lambda o, i: T.StepLR(o, step_size=[3, 5, 1][i], gamma=[0.5, 0.1, 0.9][i])),
    "multistep": (lambda o: lr_scheduler.MultiStepLR(o, milestones=[[3, 9], [5], [1, 2, 20]], gamma=[0.5, 0.1, 0.9]),
                  lambda o, i: T.MultiStepLR(o, milestones=[[3, 9], [5], [1, 2, 20]][i], gamma=[0.5, 0.1, 0.9][i])),
    "multistep_shared_milestones": (lambda o: lr_scheduler.MultiStepLR(o, milestones=[4, 12], gamma=0.2),
                                    lambda o, i: T.MultiStepLR(o, milestones=[4, 12], gamma=0.2)),
    "lambda_per_member": (lambda o: lr_scheduler.LambdaLR(o, [lambda e: 0.9 ** e, lambda e: 1 / (1 + e),
                                                              lambda e: min(1.0, (e + 1) / 5)]),
                          lambda o, i: T.LambdaLR(o, [lambda e: 0.9 ** e, lambda e: 1 / (1 + e),
                                                      lambda e: min(1.0, (e + 1) / 5)][i])),
    "lambda_shared": (lambda o: lr_scheduler.LambdaLR(o, lambda e: 0.95 ** e),
                      lambda o, i: T.LambdaLR(o, lambda e: 0.95 ** e)),
    "cosine": (lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=[10, 25, 7], eta_min=[0.0, 1e-3, 0.01]),
               lambda o, i: T.CosineAnnealingLR(o, T_max=[10, 25, 7][i], eta_min=[0.0, 1e-3, 0.01][i])),
    "linear_warmup": (lambda o: lr_scheduler.LinearLR(o, start_factor=[0.1, 0.5, 1.0], total_iters=[4, 10, 2]),
                      lambda o, i: T.LinearLR(o, start_factor=[0.1, 0.5, 1.0][i], total_iters=[4, 10, 2][i])),
    "warmup_then_cosine": (
        lambda o: lr_scheduler.SequentialLR(
            o, [lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=[3, 5, 2]),
                lr_scheduler.CosineAnnealingLR(o, T_max=[20, 15, 22])], milestones=[[3, 5, 2]]),
        lambda o, i: T.SequentialLR(
            o, [T.LinearLR(o, start_factor=0.1, total_iters=[3, 5, 2][i]),
                T.CosineAnnealingLR(o, T_max=[20, 15, 22][i])], milestones=[[3, 5, 2][i]])),
}


@pytest.mark.parametrize("optimizer_cls", [optim.SGD, optim.AdamW])
@pytest.mark.parametrize("case", list(CASES))
def test_schedule_matches_torch_per_member(case, optimizer_cls):
    ours, theirs = CASES[case]
    history = fused_lrs(optimizer_cls, ours)
    for member in range(N):
        expected = torch_lrs(member, theirs)
        got = [row[member] for row in history]
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-12), f"member {member}"


def test_warmup_cosine_helper_equals_its_sequential_definition():
    helper = fused_lrs(optim.SGD, lambda o: lr_scheduler.warmup_cosine(o, warmup_iters=[2, 4, 3],
                                                                      total_iters=25, start_factor=0.2))
    for member in range(N):
        w = [2, 4, 3][member]
        expected = torch_lrs(member, lambda o, i: T.SequentialLR(
            o, [T.LinearLR(o, start_factor=0.2, total_iters=w), T.CosineAnnealingLR(o, T_max=25 - w)],
            milestones=[w]))
        assert [row[member] for row in helper] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert helper[-1] == pytest.approx([0.0] * N, abs=1e-12)  # every member reaches eta_min at total_iters


def test_scheduled_lrs_drive_the_optimizer_per_member():
    """The lr list written by a scheduler is what each member's update uses."""
    p = torch.zeros(N, 2, requires_grad=True)
    opt = optim.SGD([p], lr=BASE_LRS)
    scheduler = lr_scheduler.StepLR(opt, step_size=1, gamma=[0.5, 1.0, 0.0])
    scheduler.step()  # lrs now 0.05, 0.03, 0.0
    p.grad = torch.ones_like(p)
    opt.step()
    torch.testing.assert_close(p[:, 0], -torch.tensor([0.05, 0.03, 0.0]))


def test_state_dict_resumes_the_schedule():
    opt = optim.SGD([torch.zeros(N, 2, requires_grad=True)], lr=BASE_LRS)
    a = lr_scheduler.CosineAnnealingLR(opt, T_max=[10, 20, 30])
    for _ in range(4):
        a.step()
    b = lr_scheduler.CosineAnnealingLR(opt, T_max=[1, 1, 1])
    b.load_state_dict(a.state_dict())
    a.step()
    b.step()
    assert a.get_last_lr() == b.get_last_lr()


def test_lambda_state_dict_leaves_the_functions_out():
    import io

    opt = optim.SGD([torch.zeros(N, 2, requires_grad=True)], lr=BASE_LRS)
    a = lr_scheduler.LambdaLR(opt, lambda e: 0.5 ** e)
    for _ in range(3):
        a.step()
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)  # a lambda could not be pickled
    buffer.seek(0)
    b = lr_scheduler.LambdaLR(opt, lambda e: 0.5 ** e)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    a.step()
    b.step()
    assert a.get_last_lr() == b.get_last_lr() == [[lr * 0.5 ** 4 for lr in BASE_LRS]]


def test_errors():
    opt = optim.SGD([torch.zeros(N, 2, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match="gamma has 2 values, but the ensemble has 3 members"):
        lr_scheduler.StepLR(opt, step_size=2, gamma=[0.1, 0.2])
    with pytest.raises(ValueError, match="member 1: T_max=0"):
        lr_scheduler.CosineAnnealingLR(opt, T_max=[5, 0, 5])
    with pytest.raises(TypeError, match="needs a fused_ensemble.optim optimizer"):
        lr_scheduler.StepLR(torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1), step_size=1)
    with pytest.raises(ValueError, match="member 2: need 1 <= warmup_iters < total_iters"):
        lr_scheduler.warmup_cosine(opt, warmup_iters=[2, 2, 10], total_iters=10)
    with pytest.raises(ValueError, match="member 1: milestones \\[5, 2\\] must be increasing"):
        lr_scheduler.MultiStepLR(opt, milestones=[[1], [5, 2], [3]])
    with pytest.raises(ValueError, match="milestones has 2 lists, but the ensemble has 3 members"):
        lr_scheduler.MultiStepLR(opt, milestones=[[1], [2]])
    with pytest.raises(TypeError, match="lr_lambda must be a function or a sequence of 3 functions"):
        lr_scheduler.LambdaLR(opt, [lambda e: 1.0])
