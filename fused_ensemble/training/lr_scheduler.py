"""Per-member learning-rate schedules for ``fused_ensemble.optim`` optimizers.

Each scheduler mirrors its ``torch.optim.lr_scheduler`` namesake, but every schedule parameter (``gamma``,
``T_max``, ``step_size``, warmup length, ...) may be one value for all members or one value per member, and
it writes ``group["lr"]`` as a list of N learning rates (one per member). Schedules are computed in closed
form from each member's base learning rate (``group["initial_lr"]``), so they compose without drift:
``SequentialLR`` switches each member to the next schedule at that member's own milestone.

Use like torch's: build after the optimizer, call ``scheduler.step()`` once per epoch (or iteration) after
``optimizer.step()``. torch's own schedulers work with these optimizers while ``lr`` is one number for all members;
with per-member learning rates they fail on list arithmetic: use these, or run any torch scheduler once per member
through ``PerMemberScheduler`` (OneCycleLR, CosineAnnealingWarmRestarts, ReduceLROnPlateau, ...).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence

import torch

from fused_ensemble.training.member_values import MemberValue, check_range, per_member

__all__ = ["MemberLRScheduler", "LambdaLR", "StepLR", "MultiStepLR", "CosineAnnealingLR", "LinearLR", "SequentialLR",
           "warmup_cosine", "PerMemberScheduler"]


def _num_members(optimizer, scheduler_name: str) -> int:
    if not hasattr(optimizer, "num_members"):
        raise TypeError(f"{scheduler_name} needs a fused_ensemble.optim optimizer (with num_members), "
                        f"got {type(optimizer).__name__}")
    return optimizer.num_members


class MemberLRScheduler:
    """Base class: subclasses define ``member_lr(epoch, base_lr, member)``, the closed-form schedule."""

    def __init__(self, optimizer, last_epoch: int = -1):
        self.optimizer = optimizer
        self.num_members = _num_members(optimizer, type(self).__name__)
        for index, group in enumerate(optimizer.param_groups):
            if last_epoch == -1:
                group.setdefault("initial_lr", group["lr"])
            elif "initial_lr" not in group:
                raise KeyError(f"param group {index} has no 'initial_lr'; resuming (last_epoch={last_epoch}) "
                               f"needs a scheduler that has run on this optimizer before")
        self.base_lrs = [per_member(g["initial_lr"], "initial_lr", self.num_members)
                         for g in optimizer.param_groups]
        self.last_epoch = last_epoch
        self.step()

    def member_lr(self, epoch: int, base_lr: float, member: int) -> float:
        """The learning rate of ``member`` at ``epoch`` for a base learning rate ``base_lr``."""
        raise NotImplementedError

    def lrs_at(self, epoch: int) -> list[list[float]]:
        """Per param group, the N members' learning rates at ``epoch``."""
        return [[self.member_lr(epoch, base, member) for member, base in enumerate(bases)]
                for bases in self.base_lrs]

    def step(self) -> None:
        """Advances one epoch and writes each group's per-member learning rates."""
        self.last_epoch += 1
        self._last_lr = self.lrs_at(self.last_epoch)
        for group, lrs in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = list(lrs)

    def get_last_lr(self) -> list[list[float]]:
        """Per param group, the N learning rates written by the last ``step()``."""
        return self._last_lr

    def state_dict(self) -> dict:
        """The scheduler's state (everything but the optimizer and nested schedulers)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "schedulers")}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores a ``state_dict()``."""
        self.__dict__.update(state_dict)


class LambdaLR(MemberLRScheduler):
    """``lr = base_lr * lr_lambda(epoch)``: one function for every member or one per member. As torch's, its
    ``state_dict`` leaves the functions out (rebuild the scheduler with them, then load the state)."""

    def __init__(self, optimizer, lr_lambda, last_epoch: int = -1):
        n = _num_members(optimizer, type(self).__name__)
        if callable(lr_lambda):
            self.lr_lambdas = [lr_lambda] * n
        elif isinstance(lr_lambda, Sequence) and len(lr_lambda) == n and all(map(callable, lr_lambda)):
            self.lr_lambdas = list(lr_lambda)
        else:
            raise TypeError(f"lr_lambda must be a function or a sequence of {n} functions (one per member), got "
                            f"{type(lr_lambda).__name__}")
        super().__init__(optimizer, last_epoch)

    def member_lr(self, epoch, base_lr, member):
        return base_lr * self.lr_lambdas[member](epoch)

    def state_dict(self) -> dict:
        return {k: v for k, v in super().state_dict().items() if k != "lr_lambdas"}


class StepLR(MemberLRScheduler):
    """``lr = base_lr * gamma ** (epoch // step_size)``, with per-member ``step_size`` and ``gamma``."""

    def __init__(self, optimizer, step_size: MemberValue, gamma: MemberValue = 0.1, last_epoch: int = -1):
        n = _num_members(optimizer, type(self).__name__)
        self.step_size = per_member(step_size, "step_size", n, int)
        self.gamma = per_member(gamma, "gamma", n)
        check_range(self.step_size, "step_size", 1)
        super().__init__(optimizer, last_epoch)

    def member_lr(self, epoch, base_lr, member):
        return base_lr * self.gamma[member] ** (epoch // self.step_size[member])


class MultiStepLR(MemberLRScheduler):
    """``lr = base_lr * gamma ** (number of milestones <= epoch)``: ``milestones`` one increasing list for every
    member or one list per member, ``gamma`` one value or one per member."""

    def __init__(self, optimizer, milestones: Sequence, gamma: MemberValue = 0.1, last_epoch: int = -1):
        n = _num_members(optimizer, type(self).__name__)
        if not isinstance(milestones, Sequence) or isinstance(milestones, str):
            raise TypeError(f"milestones must be a list of epochs or one list per member, got "
                            f"{type(milestones).__name__}")
        per_member_lists = bool(milestones) and all(isinstance(m, Sequence) for m in milestones)
        if per_member_lists and len(milestones) != n:
            raise ValueError(f"milestones has {len(milestones)} lists, but the ensemble has {n} members")
        lists = milestones if per_member_lists else [milestones] * n
        self.milestones = [per_member(list(ms), f"milestones of member {member}", len(ms), int)
                           for member, ms in enumerate(lists)]
        for member, ms in enumerate(self.milestones):
            if any(b <= a for a, b in zip(ms, ms[1:])):
                raise ValueError(f"member {member}: milestones {ms} must be increasing")
        self.gamma = per_member(gamma, "gamma", n)
        super().__init__(optimizer, last_epoch)

    def member_lr(self, epoch, base_lr, member):
        return base_lr * self.gamma[member] ** bisect.bisect_right(self.milestones[member], epoch)


class CosineAnnealingLR(MemberLRScheduler):
    """``lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2``, per-member ``T_max``, ``eta_min``.

    Past ``T_max`` the curve continues periodically, as torch's does.
    """

    def __init__(self, optimizer, T_max: MemberValue, eta_min: MemberValue = 0.0, last_epoch: int = -1):
        n = _num_members(optimizer, type(self).__name__)
        self.T_max = per_member(T_max, "T_max", n, int)
        self.eta_min = per_member(eta_min, "eta_min", n)
        check_range(self.T_max, "T_max", 1)
        super().__init__(optimizer, last_epoch)

    def member_lr(self, epoch, base_lr, member):
        eta_min = self.eta_min[member]
        return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * epoch / self.T_max[member])) / 2


class LinearLR(MemberLRScheduler):
    """Linear warmup (or decay) of the factor from ``start_factor`` to ``end_factor`` over ``total_iters``."""

    def __init__(self, optimizer, start_factor: MemberValue = 1.0 / 3, end_factor: MemberValue = 1.0,
                 total_iters: MemberValue = 5, last_epoch: int = -1):
        n = _num_members(optimizer, type(self).__name__)
        self.start_factor = per_member(start_factor, "start_factor", n)
        self.end_factor = per_member(end_factor, "end_factor", n)
        self.total_iters = per_member(total_iters, "total_iters", n, int)
        check_range(self.start_factor, "start_factor", 0.0, 1.0, low_inclusive=False)
        check_range(self.end_factor, "end_factor", 0.0, 1.0)
        check_range(self.total_iters, "total_iters", 1)
        super().__init__(optimizer, last_epoch)

    def member_lr(self, epoch, base_lr, member):
        start, end, total = self.start_factor[member], self.end_factor[member], self.total_iters[member]
        return base_lr * (start + (end - start) * min(epoch, total) / total)


class SequentialLR(MemberLRScheduler):
    """Runs ``schedulers[k]`` from milestone k-1 on, restarting its epoch count at each milestone.

    ``milestones``: one entry per switch (``len(schedulers) - 1``), each an int or one int per member, so
    members can switch at different epochs.
    """

    def __init__(self, optimizer, schedulers: Sequence[MemberLRScheduler], milestones: Sequence[MemberValue],
                 last_epoch: int = -1):
        n = _num_members(optimizer, type(self).__name__)
        if len(schedulers) < 1 or len(milestones) != len(schedulers) - 1:
            raise ValueError(f"SequentialLR needs len(milestones) == len(schedulers) - 1, got "
                             f"{len(milestones)} milestones for {len(schedulers)} schedulers")
        for index, scheduler in enumerate(schedulers):
            if scheduler.optimizer is not optimizer:
                raise ValueError(f"schedulers[{index}] drives a different optimizer")
        per_switch = [per_member(m, f"milestones[{k}]", n, int) for k, m in enumerate(milestones)]
        self.milestones = [list(member) for member in zip(*per_switch)] if per_switch else [[] for _ in range(n)]
        for member, ms in enumerate(self.milestones):
            if any(b <= a for a, b in zip(ms, ms[1:])) or (ms and ms[0] < 1):
                raise ValueError(f"member {member}: milestones {ms} must be positive and increasing")
        self.schedulers = list(schedulers)
        super().__init__(optimizer, last_epoch)

    def member_lr(self, epoch, base_lr, member):
        ms = self.milestones[member]
        k = bisect.bisect_right(ms, epoch)
        start = ms[k - 1] if k else 0
        return self.schedulers[k].member_lr(epoch - start, base_lr, member)


def warmup_cosine(optimizer, warmup_iters: MemberValue, total_iters: MemberValue,
                  start_factor: MemberValue = 0.1, eta_min: MemberValue = 0.0) -> SequentialLR:
    """Linear warmup from ``start_factor * lr`` for ``warmup_iters``, then cosine decay to ``eta_min`` at
    ``total_iters``: ``SequentialLR([LinearLR, CosineAnnealingLR], milestones=[warmup_iters])``, per member."""
    n = optimizer.num_members
    warmup = per_member(warmup_iters, "warmup_iters", n, int)
    total = per_member(total_iters, "total_iters", n, int)
    for member, (w, t) in enumerate(zip(warmup, total)):
        if not 1 <= w < t:
            raise ValueError(f"member {member}: need 1 <= warmup_iters < total_iters, got {w} and {t}")
    linear = LinearLR(optimizer, start_factor=start_factor, end_factor=1.0, total_iters=warmup)
    cosine = CosineAnnealingLR(optimizer, T_max=[t - w for w, t in zip(warmup, total)], eta_min=eta_min)
    return SequentialLR(optimizer, [linear, cosine], milestones=[warmup])


class PerMemberScheduler:
    """Any ``torch.optim.lr_scheduler`` scheduler, one per member, driving a ``fused_ensemble.optim`` optimizer.

    ``make_scheduler(member, optimizer)`` builds member ``member``'s scheduler on a stand-in torch optimizer
    whose param groups hold that member's ``lr`` (and ``momentum`` or ``betas``, which schedulers such as
    OneCycleLR cycle); each ``step()`` steps the N schedulers and writes their values into the fused optimizer's
    groups as per-member lists. Member i's values are therefore exactly those of the torch scheduler run on member
    i's own torch optimizer::

        scheduler = PerMemberScheduler(opt, lambda member, optimizer: torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[0.1, 0.05, 0.2, 0.1][member], total_steps=1000))

    ``step(metrics)`` passes ``metrics`` (one value for all, or one per member) to schedulers that take one, such
    as ReduceLROnPlateau.
    """

    def __init__(self, optimizer, make_scheduler: Callable[[int, torch.optim.Optimizer], object]):
        self.optimizer = optimizer
        self.num_members = _num_members(optimizer, type(self).__name__)
        self._stand_ins = [self._stand_in(member) for member in range(self.num_members)]
        self.schedulers = [make_scheduler(member, stand_in) for member, stand_in in enumerate(self._stand_ins)]
        self._write()

    def _stand_in(self, member: int) -> torch.optim.Optimizer:
        """A torch optimizer over one dummy tensor per group, with member ``member``'s values; AdamW where the
        groups have betas (OneCycleLR cycles betas[0] only when the optimizer's defaults have them)."""
        n, groups = self.num_members, []
        for group in self.optimizer.param_groups:
            values = {"params": [torch.zeros(1, requires_grad=True)],
                      "lr": per_member(group["lr"], "lr", n)[member]}
            if "momentum" in group:
                values["momentum"] = per_member(group["momentum"], "momentum", n)[member]
            if "betas" in group:
                values["betas"] = tuple(per_member(beta, f"betas[{k}]", n)[member]
                                        for k, beta in enumerate(group["betas"]))
            groups.append(values)
        kind = torch.optim.AdamW if "betas" in groups[0] else torch.optim.SGD
        return kind(groups, lr=groups[0]["lr"])

    def step(self, metrics=None) -> None:
        """Steps every member's scheduler (with its metric, if given) and writes their values."""
        values = None if metrics is None else per_member(metrics, "metrics", self.num_members)
        for member, (stand_in, scheduler) in enumerate(zip(self._stand_ins, self.schedulers)):
            stand_in.step()  # no gradients, nothing to update: torch's schedulers expect a step before theirs
            if values is None:
                scheduler.step()
            else:
                scheduler.step(values[member])
        self._write()

    def _write(self) -> None:
        for index, group in enumerate(self.optimizer.param_groups):
            stand_in_groups = [stand_in.param_groups[index] for stand_in in self._stand_ins]
            group["lr"] = [g["lr"] for g in stand_in_groups]
            if "momentum" in group:
                group["momentum"] = [g["momentum"] for g in stand_in_groups]
            if "betas" in group:
                group["betas"] = ([g["betas"][0] for g in stand_in_groups], [g["betas"][1] for g in stand_in_groups])

    def get_last_lr(self) -> list[list[float]]:
        """Per param group, the N learning rates written by the last ``step()``."""
        return [list(group["lr"]) for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        """Every member scheduler's state and its stand-in's hyperparameters (recursive schedules read them)."""
        return {"schedulers": [scheduler.state_dict() for scheduler in self.schedulers],
                "stand_ins": [[{k: v for k, v in g.items() if k != "params"} for g in stand_in.param_groups]
                              for stand_in in self._stand_ins]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores a ``state_dict()`` (build the scheduler with the same ``make_scheduler`` first)."""
        for scheduler, state in zip(self.schedulers, state_dict["schedulers"]):
            scheduler.load_state_dict(state)
        for stand_in, groups in zip(self._stand_ins, state_dict["stand_ins"]):
            for group, values in zip(stand_in.param_groups, groups):
                group.update(values)
        self._write()
