"""Dynamic loss scaling per member, for float16 mixed-precision training of a fused ensemble.

``torch.amp.GradScaler`` keeps one scale: when any member's gradients overflow it skips the step of EVERY member
and halves everyone's scale, so one member's overflow changes the others' trainings. ``MemberGradScaler`` keeps a
scale and a growth tracker per member: member i's loss is multiplied by its own scale, its gradients are checked
and unscaled by it, and only the members that overflowed skip the step (through the optimizer's per-member step,
as frozen members do) and back off. Member i then trains exactly as it would alone with a ``torch.amp.GradScaler``
of the same settings::

    scaler = MemberGradScaler(fused.num_members)
    with torch.autocast("cuda", dtype=torch.float16):
        losses = member_cross_entropy(fused(x), y, reduction="none")     # [N]: one loss per member
    scaler.scale(losses).sum().backward()
    scaler.unscale_(opt)                                # optional: to clip with fused_ensemble.clip_grad_norm_
    scaler.step(opt)                                    # opt: fused_ensemble.optim.SGD / AdamW
    scaler.update()

bfloat16 autocast needs no loss scaling (its range is float32's).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from fused_ensemble.training.member_values import MemberValue, check_range, member_view, per_member

__all__ = ["MemberGradScaler"]

_READY, _UNSCALED, _STEPPED = "ready", "unscaled", "stepped"


class MemberGradScaler:
    """``torch.amp.GradScaler`` with one scale per member (see the module doc).

    ``init_scale`` may be a number or one per member; ``growth_factor``, ``backoff_factor`` and
    ``growth_interval`` are shared and mean what they mean in torch: a member's scale is multiplied by
    ``backoff_factor`` at each step where its gradients hold an inf or NaN (that member skips the step), and by
    ``growth_factor`` after ``growth_interval`` steps in a row without one. ``device``: where the scales live
    (they move to the losses' device on first use). ``enabled=False`` makes every method a pass-through.
    """

    def __init__(self, num_members: int, device: str | torch.device = "cuda", init_scale: MemberValue = 2.0**16,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5, growth_interval: int = 2000,
                 enabled: bool = True):
        if num_members < 1:
            raise ValueError(f"num_members must be at least 1, got {num_members}")
        scales = per_member(init_scale, "init_scale", num_members)
        check_range(scales, "init_scale", 0.0, low_inclusive=False)
        if growth_factor <= 1.0:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor}")
        if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) or growth_interval < 1:
            raise ValueError(f"growth_interval must be a positive int, got {growth_interval!r}")
        self.num_members = int(num_members)
        self._enabled = bool(enabled)
        self._growth_factor = float(growth_factor)
        self._backoff_factor = float(backoff_factor)
        self._growth_interval = growth_interval
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            device = torch.device("cpu")  # as torch's scaler, usable (e.g. in tests) on a machine without CUDA
        self._scale = torch.tensor(scales, dtype=torch.float32, device=device)
        self._growth_tracker = torch.zeros(self.num_members, dtype=torch.int32, device=device)
        self._per_optimizer = defaultdict(lambda: {"stage": _READY, "found_inf": None})

    def is_enabled(self) -> bool:
        return self._enabled

    # -- the three calls of a step --------------------------------------------------------------------------
    def scale(self, outputs: torch.Tensor) -> torch.Tensor:
        """``outputs`` (member losses: ``[N]``, or any ``[N, ...]``) times each member's scale. The result is
        float32 at least (a float16 loss times 2**16 would overflow)."""
        if not self._enabled:
            return outputs
        if not isinstance(outputs, torch.Tensor) or outputs.dim() == 0 or outputs.shape[0] != self.num_members:
            shape = tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
            raise ValueError(f"scale() takes the member losses, a tensor of shape [{self.num_members}, ...] "
                             f"(e.g. member_cross_entropy(..., reduction='none')), got {shape}: a loss already "
                             "summed over members cannot be scaled per member")
        self._to(outputs.device)
        return outputs * member_view(self._scale, outputs)

    def unscale_(self, optimizer) -> None:
        """Divides the optimizer's gradients by their members' scales and records which members hold an inf or
        NaN. Optional before ``step`` (to clip unscaled gradients); at most once per optimizer and step."""
        if not self._enabled:
            return
        state = self._per_optimizer[id(optimizer)]
        if state["stage"] is _UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update()")
        if state["stage"] is _STEPPED:
            raise RuntimeError("unscale_() is being called after step()")
        inv_scale = self._scale.double().reciprocal().float()  # as torch: the reciprocal in float64
        by_device_dtype: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for group in optimizer.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.dim() == 0 or g.shape[0] != self.num_members:
                    raise ValueError(f"a gradient of shape {tuple(g.shape)} has no member dim 0 of size "
                                     f"{self.num_members}")
                if g.dtype == torch.float16:
                    raise ValueError("attempting to unscale float16 gradients: keep the parameters in float32 "
                                     "(autocast runs the layers in float16)")
                if g.is_sparse:
                    raise ValueError("MemberGradScaler does not unscale sparse gradients")
                by_device_dtype[(g.device, g.dtype)].append(g)
        found_inf = torch.zeros(self.num_members, dtype=torch.float32, device=self._scale.device)
        for (device, _), grads in by_device_dtype.items():
            # torch's own one-pass check-and-unscale kernel, once per member over that member's slices of every
            # gradient: member i's numbers are exactly torch's, at N foreach calls instead of one.
            member_found = torch.zeros(self.num_members, dtype=torch.float32, device=device)
            member_inv_scale = inv_scale.to(device)
            slices = [g.unbind(0) for g in grads]
            for member in range(self.num_members):
                torch._amp_foreach_non_finite_check_and_unscale_(
                    [s[member] for s in slices], member_found[member:member + 1],
                    member_inv_scale[member:member + 1])
            found_inf += member_found.to(found_inf.device)
        found_inf = found_inf > 0
        state["found_inf"] = found_inf
        state["stage"] = _UNSCALED

    def step(self, optimizer, *args, **kwargs):
        """Unscales (unless ``unscale_`` did) and steps every member whose gradients are finite; the others skip
        this step, as frozen members do. ``optimizer``: a ``fused_ensemble.optim`` optimizer. Waits for the
        device once (for the members to skip), as torch's scaler does with a non-fused optimizer."""
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if not hasattr(optimizer, "_member_mask"):
            raise TypeError("MemberGradScaler.step needs a fused_ensemble.optim optimizer (SGD, AdamW), which can "
                            f"skip single members; got {type(optimizer).__name__}")
        if "closure" in kwargs or args:
            raise RuntimeError("closure use is not supported by MemberGradScaler.step")
        state = self._per_optimizer[id(optimizer)]
        if state["stage"] is _STEPPED:
            raise RuntimeError("step() has already been called since the last update()")
        if state["stage"] is _READY:
            self.unscale_(optimizer)
        result = optimizer.step(skip_members=state["found_inf"].cpu(), **kwargs)
        state["stage"] = _STEPPED
        return result

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        """Backs off the scales of the members that overflowed this step, grows those due to grow, and readies
        the scaler for the next step. ``new_scale`` (a number, or ``[N]``) sets the scales instead."""
        if not self._enabled:
            return
        if new_scale is not None:
            values = new_scale if isinstance(new_scale, torch.Tensor) else float(new_scale)
            self._scale.copy_(torch.as_tensor(values, dtype=torch.float32).expand(self.num_members))
        else:
            found = [s["found_inf"] for s in self._per_optimizer.values() if s["found_inf"] is not None]
            if not found:
                raise RuntimeError("no inf checks were recorded before update(): call step() (or unscale_()) "
                                   "for an optimizer first")
            found_inf = torch.stack(found).any(dim=0).to(self._scale.device)
            # torch._amp_update_scale_, member by member, without a loop over members.
            scale = torch.where(found_inf, self._scale * self._backoff_factor, self._scale)
            tracker = torch.where(found_inf, torch.zeros_like(self._growth_tracker), self._growth_tracker + 1)
            grow = tracker == self._growth_interval
            grown = scale * self._growth_factor
            self._scale.copy_(torch.where(grow & torch.isfinite(grown), grown, scale))
            self._growth_tracker.copy_(torch.where(grow, torch.zeros_like(tracker), tracker))
        self._per_optimizer.clear()

    # -- inspection and checkpoints -------------------------------------------------------------------------
    def get_scale(self) -> torch.Tensor:
        """The members' scales, ``[N]`` float32 on the CPU (ones when disabled)."""
        return self._scale.cpu() if self._enabled else torch.ones(self.num_members)

    def get_growth_factor(self) -> float:
        return self._growth_factor

    def get_backoff_factor(self) -> float:
        return self._backoff_factor

    def get_growth_interval(self) -> int:
        return self._growth_interval

    def state_dict(self) -> dict:
        """Scales, growth trackers and settings (empty when disabled, as torch's)."""
        if not self._enabled:
            return {}
        return {"scale": self._scale.tolist(), "growth_factor": self._growth_factor,
                "backoff_factor": self._backoff_factor, "growth_interval": self._growth_interval,
                "_growth_tracker": self._growth_tracker.tolist()}

    def load_state_dict(self, state_dict: dict) -> None:
        if not self._enabled:
            return
        if not state_dict:
            raise RuntimeError("the state_dict is empty: it was saved from a disabled scaler")
        if len(state_dict["scale"]) != self.num_members:
            raise ValueError(f"the state_dict holds {len(state_dict['scale'])} members' scales, this scaler has "
                             f"{self.num_members} members")
        self._scale.copy_(torch.tensor(state_dict["scale"], dtype=torch.float32))
        self._growth_tracker.copy_(torch.tensor(state_dict["_growth_tracker"], dtype=torch.int32))
        self._growth_factor = float(state_dict["growth_factor"])
        self._backoff_factor = float(state_dict["backoff_factor"])
        self._growth_interval = int(state_dict["growth_interval"])

    def _to(self, device: torch.device) -> None:
        if self._scale.device != device:
            self._scale = self._scale.to(device)
            self._growth_tracker = self._growth_tracker.to(device)
