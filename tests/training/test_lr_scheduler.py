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


# PerMemberScheduler: (our optimizer class, its per-member keyword arguments, the torch optimizer of one member,
# the scheduler factory, the per-member metric stream or None)
MAX_LRS = [0.3, 0.1, 0.6]
PER_MEMBER_CASES = {
    "one_cycle_sgd_momentum": (
        optim.SGD, dict(lr=BASE_LRS, momentum=[0.9, 0.8, 0.95]),
        lambda i: torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=BASE_LRS[i], momentum=[0.9, 0.8, 0.95][i]),
        lambda i, o: T.OneCycleLR(o, max_lr=MAX_LRS[i], total_steps=EPOCHS + 1, pct_start=[0.3, 0.2, 0.5][i]),
        None),
    "one_cycle_adamw_betas": (
        optim.AdamW, dict(lr=BASE_LRS, betas=([0.9, 0.85, 0.95], 0.999)),
        lambda i: torch.optim.AdamW([torch.zeros(2, requires_grad=True)], lr=BASE_LRS[i],
                                    betas=([0.9, 0.85, 0.95][i], 0.999)),
        lambda i, o: T.OneCycleLR(o, max_lr=MAX_LRS[i], total_steps=EPOCHS + 1, anneal_strategy="linear"),
        None),
    "warm_restarts": (
        optim.SGD, dict(lr=BASE_LRS),
        lambda i: torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=BASE_LRS[i]),
        lambda i, o: T.CosineAnnealingWarmRestarts(o, T_0=[3, 5, 7][i], T_mult=[1, 2, 1][i]),
        None),
    "plateau_per_member_metrics": (
        optim.SGD, dict(lr=BASE_LRS),
        lambda i: torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=BASE_LRS[i]),
        lambda i, o: T.ReduceLROnPlateau(o, factor=0.5, patience=[1, 2, 0][i]),
        lambda epoch: [1.0 / (1 + epoch), 1.0, (epoch % 4) * 0.1]),
}


def _hyperparameters(group, member=None):
    pick = (lambda v: v[member]) if member is not None else (lambda v: v)
    values = {"lr": pick(group["lr"])}
    if "momentum" in group:
        values["momentum"] = pick(group["momentum"])
    if "betas" in group:
        values["beta1"] = pick(group["betas"][0])
    return values


@pytest.mark.parametrize("case", list(PER_MEMBER_CASES))
def test_per_member_scheduler_runs_torchs_scheduler_for_each_member(case):
    optimizer_cls, kwargs, torch_optimizer, make_scheduler, metrics = PER_MEMBER_CASES[case]
    opt = optimizer_cls([torch.zeros(N, 2, requires_grad=True)], **kwargs)
    scheduler = lr_scheduler.PerMemberScheduler(opt, make_scheduler)
    ours = [[_hyperparameters(opt.param_groups[0], i) for i in range(N)]]
    for epoch in range(EPOCHS):
        opt.step()
        scheduler.step(None if metrics is None else metrics(epoch))
        ours.append([_hyperparameters(opt.param_groups[0], i) for i in range(N)])
    for member in range(N):
        theirs_opt = torch_optimizer(member)
        theirs_scheduler = make_scheduler(member, theirs_opt)
        theirs = [_hyperparameters(theirs_opt.param_groups[0])]
        for epoch in range(EPOCHS):
            theirs_opt.step()
            if metrics is None:
                theirs_scheduler.step()
            else:
                theirs_scheduler.step(metrics(epoch)[member])
            theirs.append(_hyperparameters(theirs_opt.param_groups[0]))
        assert [row[member] for row in ours] == theirs, f"member {member}"
    for member in range(N if metrics is None else 0):
        assert len({tuple(row[member].values()) for row in ours}) > 2, f"member {member}'s schedule never moved"
    assert ours[-1][2]["lr"] < BASE_LRS[2]  # in every case, member 2's lr has come down (plateau: its metric stalls)


def test_per_member_scheduler_drives_the_update_and_resumes():
    p = torch.zeros(N, 2, requires_grad=True)
    opt = optim.SGD([p], lr=BASE_LRS, momentum=0.9)

    def make(member, optimizer):
        return T.OneCycleLR(optimizer, max_lr=MAX_LRS[member], total_steps=10)

    scheduler = lr_scheduler.PerMemberScheduler(opt, make)
    for _ in range(3):
        opt.step()
        scheduler.step()
    state = scheduler.state_dict()
    lrs = scheduler.get_last_lr()
    p.grad = torch.ones_like(p)
    before = p.detach().clone()
    opt.step()  # plain SGD's first step with momentum: p -= lr * grad, each member with its scheduled lr
    torch.testing.assert_close(before[:, 0] - p.detach()[:, 0], torch.tensor(lrs[0]))
    resumed_opt = optim.SGD([torch.zeros(N, 2, requires_grad=True)], lr=BASE_LRS, momentum=0.9)
    resumed = lr_scheduler.PerMemberScheduler(resumed_opt, make)
    resumed.load_state_dict(state)
    assert resumed.get_last_lr() == lrs
    scheduler.step()
    resumed.step()
    assert resumed.get_last_lr() == scheduler.get_last_lr()
    assert resumed_opt.param_groups[0]["momentum"] == opt.param_groups[0]["momentum"]
