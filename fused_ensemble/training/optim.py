"""Optimizers for stacked ensembles: N members' parameters updated at once, each with its own hyperparameters.

The only rule these optimizers know is that **dim 0 of every parameter is the member index** (as in
``FusedEnsemble.parameters()`` or a ``torch.func.stack_module_state`` stack): ``p[i]`` is member i's tensor.
Every hyperparameter may be one number for all members or a length-N sequence. On the CPU the update is one C++
kernel call (below); elsewhere per-member values become ``[N, 1, ..., 1]`` tensors that broadcast over each
parameter, and the update is a handful of ``torch._foreach_*`` ops over all parameters of a group: the number of
kernels is that of ONE member's optimizer, whatever N is. (Where parameter shapes differ, CUDA runs the foreach
ops one kernel per tensor.) Neither loops over members in Python.

The arithmetic follows ``torch.optim.SGD`` / ``torch.optim.Adam`` / ``torch.optim.AdamW`` (single-tensor path)
operation by operation, so member i ends up equal, to fp32 rounding, to a torch optimizer run on member i alone.

On the CPU the update runs by default (``fused=None``) as one C++ kernel call per optimizer and parameter group
(``torch.ops.fused_ensemble_ext.member_sgd_`` / ``member_adamw_``, csrc/cpu/member_optimizers.cpp; Adam runs
AdamW's with L2-decayed gradients, see ``Adam``): one pass over
each parameter, gradient and state tensor, chunks of member slices spread over the threads, each member with its
own factors, frozen members skipped; the element loops are compiled once per CPU capability (AVX2, AVX-512).
The foreach ops stream each stacked tensor through memory once per update term; the kernels read and write each
once, as fast as ``torch.optim``'s own fused kernels on the members' tensors (docs/performance.md). The kernels
follow the single-tensor arithmetic of torch.optim operation by operation.

``fused=False``, and what the kernels do not take (float16/bfloat16; tensors other than N dense member slices one
after another, such as strided views, though channels_last weights are taken; a build without the extension), use
the foreach ops; on the CPU over cache-sized chunks of member slices (``CPU_CHUNK_ELEMENTS``), every
update term of one chunk before the next, which keeps the tensors in cache as a per-member optimizer would (the
arithmetic, element by element, is the same chunked or not). On CUDA the default is CUDA kernels of the same one-pass
update (csrc/cuda/member_optimizers.cu, one launch per parameter); the foreach ops run there on whole parameters
(``fused=False``, or a build without CUDA kernels).

``freeze(i)`` stops member i: its parameters stay bitwise unchanged and its optimizer state (moments, step
count) does not advance, until ``unfreeze(i)``. Frozen members are saved in ``state_dict()``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fused_ensemble.extension import extension_status, has_cuda_kernels, load_extension
from fused_ensemble.fusion.stacking import member_index
from fused_ensemble.training.member_values import MemberValue, check_range, member_view, per_member

__all__ = ["SGD", "Adam", "AdamW", "MemberOptimizer"]

CPU_CHUNK_ELEMENTS = 1 << 18
"""Elements per chunk of the CPU foreach update (1 MB of fp32 per tensor): every update term of a chunk runs while
its parameter, gradient and state slices are in cache (faster than larger chunks or none; bench/NOTES.md)."""


def _first_tensor(params: list):
    """The first parameter tensor in what an optimizer accepts (tensors, (name, tensor) pairs or groups)."""
    for item in params:
        if isinstance(item, dict):
            group = item["params"]
            group = [group] if isinstance(group, torch.Tensor) else list(group)
            found = _first_tensor(group)
        elif isinstance(item, tuple):
            found = item[1]
        else:
            found = item
        if found is not None:
            return found
    return None


class MemberOptimizer(torch.optim.Optimizer):
    """Base class: parameter checks, per-member hyperparameter tensors and member freezing.

    Subclasses implement ``_init_state(p, state, group)`` and ``_update(group, params, grads, states, hp)``,
    where ``hp(name)`` gives per-parameter ``[N, 1, ...]`` views of a per-member value.
    """

    #: hyperparameters that may be given per member (``betas`` is handled by Adam itself)
    member_keys: tuple[str, ...] = ()

    def __init__(self, params: Iterable, defaults: dict, num_members: int | None = None,
                 fused: bool | None = None):
        if fused not in (None, True, False):
            raise TypeError(f"fused must be None, True or False, got {fused!r}")
        self.fused = fused
        params = list(params)
        if num_members is None:
            first = _first_tensor(params)
            if first is None:
                raise ValueError("optimizer got an empty parameter list")
            if first.dim() == 0:
                raise ValueError("parameters must have a leading member dim (dim 0 = member index); "
                                 "the first parameter is a scalar")
            num_members = first.shape[0]
        if num_members < 1:
            raise ValueError(f"num_members must be at least 1, got {num_members}")
        self.num_members = int(num_members)
        self._frozen = torch.zeros(self.num_members, dtype=torch.bool)
        super().__init__(params, defaults)

    # -- parameter groups -----------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        """Adds a group after checking that every parameter has N members and every hyperparameter fits."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        names = group.get("param_names")
        for index, p in enumerate(group["params"]):
            label = f"parameter {names[index]!r}" if names else f"parameter {index}"
            where = f"{label} of param group {len(self.param_groups) - 1}"
            if p.dim() == 0 or p.shape[0] != self.num_members:
                raise ValueError(f"{where} has shape {tuple(p.shape)}: dim 0 must be the member index "
                                 f"of size {self.num_members} (the ensemble's number of members)")
        try:
            self._check_group(group)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def _check_group(self, group: dict) -> dict:
        """Validates the group's hyperparameters; returns the per-member lists (float64 math later)."""
        return {key: per_member(group[key], key, self.num_members) for key in self.member_keys}

    # -- freezing -------------------------------------------------------------------------------------------
    def _member_mask(self, members) -> torch.Tensor:
        """``members`` (a ``[N]`` bool tensor, or member indices) as a ``[N]`` bool CPU tensor."""
        if isinstance(members, torch.Tensor) and members.dtype == torch.bool:
            if members.shape != (self.num_members,):
                raise ValueError(f"a member mask must have shape ({self.num_members},), got {tuple(members.shape)}")
            return members.cpu()
        mask = torch.zeros(self.num_members, dtype=torch.bool)
        for member in (members.tolist() if isinstance(members, torch.Tensor) else members):
            mask[member_index(member, self.num_members)] = True
        return mask

    def freeze(self, member: int) -> None:
        """Stops updating ``member``: its parameters and optimizer state stay bitwise as they are."""
        self._frozen[member_index(member, self.num_members)] = True

    def unfreeze(self, member: int) -> None:
        """Resumes updating ``member`` from the state it had when frozen."""
        self._frozen[member_index(member, self.num_members)] = False

    def reset_member(self, member: int) -> None:
        """Restarts ``member``'s optimizer state (moments, momentum buffers, step counts) as if it had never taken
        a step; the other members' state is untouched. With ``FusedEnsemble.set_member`` it restarts a member."""
        index = member_index(member, self.num_members)
        with torch.no_grad():
            for state in self.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor) and value.dim() > 0:
                        value[index].zero_()

    @property
    def frozen_members(self) -> list[int]:
        """Indices of the frozen members, ascending."""
        return self._frozen.nonzero().flatten().tolist()

    def state_dict(self) -> dict:
        """``torch.optim.Optimizer.state_dict()`` plus ``"frozen_members"``."""
        state = super().state_dict()
        state["frozen_members"] = self.frozen_members
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a ``state_dict()``, frozen members included."""
        state_dict = dict(state_dict)
        frozen = state_dict.pop("frozen_members", [])
        super().load_state_dict(state_dict)
        self._frozen.zero_()
        for member in frozen:
            self.freeze(member)

    # -- the step -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None, *, skip_members=None):
        """Performs one optimization step for every member that is not frozen.

        ``skip_members``: members to leave out of this step only, as frozen ones are (parameters and state
        unchanged, step counts not advanced): a ``[N]`` bool tensor on any device, or a list of indices.
        ``fused_ensemble.amp.MemberGradScaler`` passes the members whose gradients overflowed.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        inactive = self._frozen if skip_members is None else self._frozen | self._member_mask(skip_members)
        frozen = inactive.nonzero().flatten()
        for group in self.param_groups:
            values = self._check_group(group)
            by_device_dtype: dict[tuple, list] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                by_device_dtype.setdefault((p.device, p.dtype), []).append(p)
            for (device, dtype), params in by_device_dtype.items():
                states = []
                for p in params:
                    state = self.state[p]
                    if not state:
                        self._init_state(p, state, group)
                    states.append(state)
                if self._use_fused_kernels(device, dtype, params):
                    self._fused_update(group, values, params, states, ~inactive)
                    continue
                saved = _snapshot(params, states, frozen) if len(frozen) else None
                hp = _MemberTensors(values, params, states, device, dtype)
                self._update(group, params, [p.grad for p in params], states, hp)
                if saved is not None:
                    _restore(params, states, frozen, saved)
        return loss

    def _init_state(self, p: torch.Tensor, state: dict, group: dict) -> None:
        raise NotImplementedError

    def _use_fused_kernels(self, device: torch.device, dtype: torch.dtype, params: list) -> bool:
        """Whether this (device, dtype) list of parameters runs on the C++ kernels (see the module doc)."""
        if self.fused is False:
            return False
        reason = None
        if device.type not in ("cpu", "cuda"):
            reason = f"they update CPU and CUDA parameters, got {device.type} ones"
        elif dtype not in (torch.float32, torch.float64):
            reason = f"they take float32 and float64 parameters, got {dtype}"
        elif not all(_kernel_layout(p, self.state[p]) for p in params):
            reason = ("a parameter is not dense with its member dim outermost, or its gradient or state is laid out "
                      "otherwise")
        elif not load_extension():
            reason = f"the compiled extension is {extension_status()}"
        elif device.type == "cuda" and not has_cuda_kernels():
            reason = "the compiled extension has no CUDA kernels (built without a CUDA toolkit)"
        if reason is None:
            return True
        if self.fused:
            raise RuntimeError(f"{type(self).__name__}(fused=True) cannot use its C++ kernels: {reason}")
        return False

    def _fused_update(self, group, values, params, states, active: torch.Tensor) -> None:
        """One step of the ``active`` members ([N] bool) of every parameter, in one C++ kernel call."""
        raise NotImplementedError

    def _factor_table(self, count: int, columns: list[torch.Tensor]) -> torch.Tensor:
        """The kernels' ``[P, N, F]`` float64 factors of ``count`` parameters from F columns, each ``[N]`` (the same
        for every parameter) or ``[P, N]``."""
        return torch.stack([c.to(torch.float64).expand(count, self.num_members) for c in columns], dim=-1).contiguous()

    def _update(self, group, params, grads, states, hp) -> None:
        """One step of every parameter of a (device, dtype) list: per-member factors first (they advance the
        step counts), then ``_apply`` on all tensors at once (CUDA), or chunk by chunk (CPU)."""
        factors = self._factors(group, states, hp)
        buffers = self._buffers(group, states)
        if hp.device.type != "cpu":
            self._apply(group, params, grads, buffers, factors)
            return
        for chunk in _member_chunks([params, grads, *buffers.values(), *factors.values()], CPU_CHUNK_ELEMENTS):
            chunk_buffers = dict(zip(buffers, chunk[2:2 + len(buffers)]))
            chunk_factors = dict(zip(factors, chunk[2 + len(buffers):]))
            self._apply(group, chunk[0], chunk[1], chunk_buffers, chunk_factors)

    def _factors(self, group, states, hp) -> dict[str, list[torch.Tensor]]:
        """The per-member factors of this step, each a list of ``[N, 1, ..., 1]`` views (one per parameter)."""
        raise NotImplementedError

    def _buffers(self, group, states) -> dict[str, list[torch.Tensor]]:
        """The state tensors the update reads and writes, each a list (one per parameter)."""
        raise NotImplementedError

    def _apply(self, group, params, grads, buffers, factors) -> None:
        """The update, as foreach ops over lists of (slices of) parameters, gradients, buffers and factors."""
        raise NotImplementedError


def _member_chunks(lists: list[list[torch.Tensor]], max_elements: int):
    """Splits parallel lists of per-parameter tensors (all with member dim 0; factor views broadcast) into
    chunks of whole member slices of about ``max_elements`` parameter elements: yields one list of slices
    per input list. Small parameters share a chunk; a member slice larger than the limit is a chunk alone."""
    pending = [[] for _ in lists]
    size = 0
    for i, p in enumerate(lists[0]):
        per_member = max(1, p[0].numel()) if p.dim() else 1
        step = max(1, max_elements // per_member)
        for start in range(0, p.shape[0], step):
            for out, tensors in zip(pending, lists):
                out.append(tensors[i][start:start + step])
            size += min(step, p.shape[0] - start) * per_member
            if size >= max_elements:
                yield pending
                pending = [[] for _ in lists]
                size = 0
    if pending[0]:
        yield pending


def _count_steps(states: list, active: torch.Tensor) -> None:
    """Advances the step count of the ``active`` members ([N] bool) of every parameter that keeps one."""
    for state in states:
        if "step" in state:
            state["step"].add_(active.to(state["step"].dtype))


class _MemberTensors:
    """Per-member hyperparameters as ``[N, 1, ..., 1]`` tensors, one view per parameter.

    Derived quantities (``1 - lr * wd``, bias corrections) are computed in float64 on the host, as Python
    floats are in torch.optim, then rounded once to the parameters' dtype: that keeps the fused update within
    rounding of the per-member torch.optim update.
    """

    def __init__(self, values: dict, params: list, states: list, device, dtype):
        self.values = {k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()}
        self.params = params
        self.states = states
        self.device = device
        self.dtype = dtype

    def steps(self) -> torch.Tensor:
        """The per-member step counts of every parameter, ``[P, N]`` float64 (after this step's increment)."""
        return torch.stack([s["step"] for s in self.states]).to(torch.float64)

    def views(self, value: torch.Tensor) -> list[torch.Tensor]:
        """``value`` ([N] shared by all parameters, or [P, N] one row per parameter) as broadcastable views."""
        value = value.to(device=self.device, dtype=self.dtype)
        shared = value.dim() == 1
        return [(value if shared else value[i]).view(-1, *([1] * (p.dim() - 1)))
                for i, p in enumerate(self.params)]


def _state_tensors(state: dict) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in state.items() if isinstance(v, torch.Tensor)]


def _member_major_dense(t: torch.Tensor) -> bool:
    """Whether ``t`` is N member slices one after another in memory (what the kernels walk): dense, any order of
    the other dims (channels_last weights ``[N, O, I, kh, kw]`` included), dim 0 outermost. As
    ``member_major_dense`` in csrc/member_optimizer_factors.h."""
    if t.dim() == 0 or (t.size(0) > 1 and t.stride(0) * t.size(0) != t.numel()):
        return False
    expected = 1  # dense: the strides of the dims of size > 1, in increasing order, are the running products
    for stride, size in sorted((t.stride(d), t.size(d)) for d in range(t.dim()) if t.size(d) != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _kernel_layout(p: torch.Tensor, state: dict) -> bool:
    """Whether the kernels take ``p``: member-major dense, its gradient and state tensors in its element order."""
    return _member_major_dense(p) and all(_same_layout(t, p) for t in (p.grad, *_state_tensors_of(state)))


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same strides (dims of size 1 aside): the same element order in memory."""
    return a.shape == b.shape and all(a.stride(d) == b.stride(d) for d in range(a.dim()) if a.size(d) != 1)


def _state_tensors_of(state: dict) -> list[torch.Tensor]:
    """The per-element state tensors (the step counts, ``[N]``, are read one by one, not by the kernels)."""
    return [v for k, v in _state_tensors(state) if k != "step"]


def _snapshot(params, states, frozen):
    """Copies of the frozen members' slices of every parameter and state tensor (all have member dim 0)."""
    def take(t):
        return t.index_select(0, frozen.to(t.device))
    return [(take(p), {k: take(v) for k, v in _state_tensors(s)}) for p, s in zip(params, states)]


def _restore(params, states, frozen, saved) -> None:
    """Writes the frozen members' slices back, so they end bitwise as they started."""
    for p, s, (p_saved, s_saved) in zip(params, states, saved):
        p.index_copy_(0, frozen.to(p.device), p_saved)
        for k, v in s_saved.items():
            s[k].index_copy_(0, frozen.to(s[k].device), v)


class SGD(MemberOptimizer):
    """SGD with momentum, dampening, Nesterov momentum and (coupled) weight decay, per member.

    Same update as ``torch.optim.SGD`` for each member i::

        g = grad_i + weight_decay_i * p_i
        buf_i = g (first step) or momentum_i * buf_i + (1 - dampening_i) * g
        g = g + momentum_i * buf_i (nesterov) or buf_i (momentum_i != 0) or g
        p_i -= lr_i * g

    ``lr``, ``momentum``, ``dampening`` and ``weight_decay`` may each be a number or a length-N sequence.
    ``params``: parameters whose dim 0 is the member index (e.g. ``fused.parameters()``); ``num_members``
    defaults to dim 0 of the first parameter. ``fused``: None (default) runs the one-pass C++/CUDA kernels on
    the parameters they take and foreach ops elsewhere, False always the foreach ops, True requires the one-pass
    kernels, on the CPU or CUDA (a RuntimeError says why they cannot run); see the module doc.
    """

    member_keys = ("lr", "momentum", "dampening", "weight_decay")

    def __init__(self, params: Iterable, lr: MemberValue = 1e-3, momentum: MemberValue = 0.0,
                 dampening: MemberValue = 0.0, weight_decay: MemberValue = 0.0, nesterov: bool = False,
                 num_members: int | None = None, fused: bool | None = None):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov)
        super().__init__(params, defaults, num_members, fused)

    def _check_group(self, group):
        values = super()._check_group(group)
        check_range(values["lr"], "lr", 0.0)
        check_range(values["momentum"], "momentum", 0.0)
        check_range(values["weight_decay"], "weight_decay", 0.0)
        if group["nesterov"]:
            check_range(values["momentum"], "momentum (nesterov needs momentum > 0)", 0.0, low_inclusive=False)
            check_range(values["dampening"], "dampening (nesterov needs zero dampening)", 0.0, 0.0)
        return values

    def _init_state(self, p, state, group):
        if any(m != 0 for m in per_member(group["momentum"], "momentum", self.num_members)):
            state["step"] = torch.zeros(self.num_members, dtype=torch.float32)
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _factors(self, group, states, hp):
        lr, momentum = hp.values["lr"], hp.values["momentum"]
        weight_decay = hp.values["weight_decay"]
        factors = {"neg_lr": hp.views(-lr)}
        if bool((weight_decay != 0).any()):
            factors["weight_decay"] = hp.views(weight_decay)
        if bool((momentum != 0).any()):
            # torch.optim starts the buffer as a copy of the first gradient and ignores dampening when a
            # member's momentum is 0: buffer = 0 * buffer + 1 * g reproduces both without branching on members.
            first = hp.steps() == 0
            factors["buffer_decay"] = hp.views(torch.where(first, 0.0, momentum))
            factors["grad_scale"] = hp.views(1 - torch.where(first | (momentum == 0), 0.0, hp.values["dampening"]))
            factors["momentum"] = hp.views(momentum)
            torch._foreach_add_([s["step"] for s in states], 1)
        return factors

    def _buffers(self, group, states):
        if states and "momentum_buffer" in states[0]:
            return {"momentum_buffer": [s["momentum_buffer"] for s in states]}
        return {}

    def _fused_update(self, group, values, params, states, active):
        v = {key: torch.tensor(values[key], dtype=torch.float64) for key in self.member_keys}
        buffers = self._buffers(group, states).get("momentum_buffer", [])
        if buffers:
            # torch starts a member's buffer as a copy of its first gradient (a member frozen from the start, or
            # a parameter group added later, starts later than the others).
            first_step = torch.stack([s["step"] for s in states]) == 0
            momentum = v["momentum"]
        else:
            first_step = momentum = torch.zeros(self.num_members)
        factors = self._factor_table(len(params), [-v["lr"], v["weight_decay"], momentum, 1 - v["dampening"],
                                                   first_step, active])
        torch.ops.fused_ensemble_ext.member_sgd_(params, [p.grad for p in params], buffers, factors,
                                                 bool(group["nesterov"]))
        _count_steps(states, active)

    def _apply(self, group, params, grads, buffers, factors):
        # addcmul with a broadcast [N, 1, ...] factor: one pass and no temporary per update term.
        if "weight_decay" in factors:
            grads = torch._foreach_addcmul(grads, params, factors["weight_decay"])
        if "momentum" in factors:
            momentum_buffers = buffers["momentum_buffer"]
            torch._foreach_mul_(momentum_buffers, factors["buffer_decay"])
            torch._foreach_addcmul_(momentum_buffers, grads, factors["grad_scale"])
            if group["nesterov"]:
                grads = torch._foreach_addcmul(grads, momentum_buffers, factors["momentum"])
            else:
                grads = momentum_buffers
        torch._foreach_addcmul_(params, grads, factors["neg_lr"])


class Adam(MemberOptimizer):
    """Adam (L2 weight decay added to the gradient, optional AMSGrad), per member.

    Same update as ``torch.optim.Adam`` for each member i, with its own step count t_i::

        g = grad_i + weight_decay_i * p_i
        m_i = lerp(m_i, g, 1 - beta1_i);  v_i = beta2_i * v_i + (1 - beta2_i) * g * g
        p_i -= lr_i / (1 - beta1_i^t_i) * m_i / (sqrt(v_i) / sqrt(1 - beta2_i^t_i) + eps_i)

    ``lr``, ``eps``, ``weight_decay`` may be numbers or length-N sequences; ``betas`` is a pair whose two
    entries may each be a number or a length-N sequence. ``amsgrad`` is shared by all members. ``fused`` as in
    ``SGD``.

    The one-pass kernels are AdamW's, which have no L2 term: where a member has weight decay, they are handed the
    gradients ``grad + weight_decay * p``, computed first (a temporary the size of the gradients, as
    ``torch.optim.Adam`` makes one), and a decoupled decay of zero.
    """

    member_keys = ("lr", "eps", "weight_decay")
    #: True: ``p *= 1 - lr * weight_decay`` before the update (AdamW); False: L2, added to the gradient (Adam)
    decoupled_weight_decay = False

    def __init__(self, params: Iterable, lr: MemberValue = 1e-3, betas=(0.9, 0.999), eps: MemberValue = 1e-8,
                 weight_decay: MemberValue = 0.0, amsgrad: bool = False, num_members: int | None = None,
                 fused: bool | None = None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
        super().__init__(params, defaults, num_members, fused)

    def _check_group(self, group):
        values = super()._check_group(group)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError("betas must be a pair (beta1, beta2), each a number or one value per member")
        values["beta1"] = per_member(betas[0], "betas[0]", self.num_members)
        values["beta2"] = per_member(betas[1], "betas[1]", self.num_members)
        check_range(values["lr"], "lr", 0.0)
        check_range(values["eps"], "eps", 0.0)
        check_range(values["weight_decay"], "weight_decay", 0.0)
        check_range(values["beta1"], "betas[0]", 0.0, 1.0, high_inclusive=False)
        check_range(values["beta2"], "betas[1]", 0.0, 1.0, high_inclusive=False)
        return values

    def _init_state(self, p, state, group):
        state["step"] = torch.zeros(self.num_members, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _factors(self, group, states, hp):
        v = hp.values
        lr, beta1, beta2 = v["lr"], v["beta1"], v["beta2"]
        torch._foreach_add_([s["step"] for s in states], 1)
        steps = hp.steps()
        bias_correction1 = 1 - beta1 ** steps
        bias_correction2_sqrt = (1 - beta2 ** steps).sqrt()
        factors = {"one_minus_beta1": hp.views(1 - beta1), "beta2": hp.views(beta2),
                   "one_minus_beta2": hp.views(1 - beta2), "bias_correction2_sqrt": hp.views(bias_correction2_sqrt),
                   "eps": hp.views(v["eps"]), "neg_step_size": hp.views(-(lr / bias_correction1))}
        if bool((v["weight_decay"] != 0).any()):
            if self.decoupled_weight_decay:
                factors["decay"] = hp.views(1 - lr * v["weight_decay"])
            else:
                factors["l2"] = hp.views(v["weight_decay"])
        return factors

    def _buffers(self, group, states):
        buffers = {"exp_avg": [s["exp_avg"] for s in states], "exp_avg_sq": [s["exp_avg_sq"] for s in states]}
        if group["amsgrad"]:
            buffers["max_exp_avg_sq"] = [s["max_exp_avg_sq"] for s in states]
        return buffers

    def _fused_update(self, group, values, params, states, active):
        _count_steps(states, active)  # bias corrections use this step's count
        v = {key: torch.tensor(values[key], dtype=torch.float64)
             for key in ("lr", "beta1", "beta2", "eps", "weight_decay")}
        steps = torch.stack([s["step"] for s in states]).to(torch.float64)
        bias_correction1 = 1 - v["beta1"] ** steps
        bias_correction2_sqrt = (1 - v["beta2"] ** steps).sqrt()
        grads = [p.grad for p in params]
        if self.decoupled_weight_decay:
            decay = 1 - v["lr"] * v["weight_decay"]
        else:
            decay = torch.ones(self.num_members, dtype=torch.float64)
            if bool((v["weight_decay"] != 0).any()):
                grads = _l2_decayed(grads, params, v["weight_decay"])
        factors = self._factor_table(len(params), [
            decay, 1 - v["beta1"], v["beta2"], 1 - v["beta2"], bias_correction2_sqrt, v["eps"],
            -(v["lr"] / bias_correction1), active])
        buffers = self._buffers(group, states)
        torch.ops.fused_ensemble_ext.member_adamw_(params, grads, buffers["exp_avg"], buffers["exp_avg_sq"],
                                                   buffers.get("max_exp_avg_sq", []), factors)

    def _apply(self, group, params, grads, buffers, factors):
        if "decay" in factors:
            torch._foreach_mul_(params, factors["decay"])
        if "l2" in factors:
            grads = torch._foreach_addcmul(grads, params, factors["l2"])
        exp_avgs, exp_avg_sqs = buffers["exp_avg"], buffers["exp_avg_sq"]
        torch._foreach_lerp_(exp_avgs, grads, factors["one_minus_beta1"])
        torch._foreach_mul_(exp_avg_sqs, factors["beta2"])
        # (1 - beta2) * g first, then * g: the order torch's addcmul(g, g, value=1 - beta2) multiplies in.
        torch._foreach_addcmul_(exp_avg_sqs, torch._foreach_mul(grads, factors["one_minus_beta2"]), grads)
        second_moments = exp_avg_sqs
        if group["amsgrad"]:
            second_moments = buffers["max_exp_avg_sq"]
            torch._foreach_maximum_(second_moments, exp_avg_sqs)
        denom = torch._foreach_sqrt(second_moments)
        torch._foreach_div_(denom, factors["bias_correction2_sqrt"])
        torch._foreach_add_(denom, factors["eps"])
        # p += exp_avg / (denom / -step_size): the per-member step size folded into denom saves a temporary.
        torch._foreach_div_(denom, factors["neg_step_size"])
        torch._foreach_addcdiv_(params, exp_avgs, denom)


class AdamW(Adam):
    """AdamW (decoupled weight decay, optional AMSGrad), per member.

    Same update as ``torch.optim.AdamW`` for each member i, with its own step count t_i::

        p_i *= 1 - lr_i * weight_decay_i
        m_i = lerp(m_i, g, 1 - beta1_i);  v_i = beta2_i * v_i + (1 - beta2_i) * g * g
        p_i -= lr_i / (1 - beta1_i^t_i) * m_i / (sqrt(v_i) / sqrt(1 - beta2_i^t_i) + eps_i)

    ``lr``, ``eps``, ``weight_decay`` may be numbers or length-N sequences; ``betas`` is a pair whose two
    entries may each be a number or a length-N sequence. ``amsgrad`` is shared by all members. ``fused`` as in
    ``SGD``. A subclass of ``Adam``, as ``torch.optim.AdamW`` is of ``torch.optim.Adam``.
    """

    decoupled_weight_decay = True

    def __init__(self, params: Iterable, lr: MemberValue = 1e-3, betas=(0.9, 0.999), eps: MemberValue = 1e-8,
                 weight_decay: MemberValue = 1e-2, amsgrad: bool = False, num_members: int | None = None,
                 fused: bool | None = None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, num_members, fused)


def _l2_decayed(grads: list[torch.Tensor], params: list[torch.Tensor], weight_decay: torch.Tensor) -> list:
    """``grad + weight_decay * p`` per member (``weight_decay`` ``[N]``), in new tensors laid out as the gradients
    (the kernels need the parameters' layout, which the gradients they take already have)."""
    decayed = [g.clone(memory_format=torch.preserve_format) for g in grads]
    factors = [member_view(weight_decay.to(p.dtype), p) for p in params]
    torch._foreach_addcmul_(decayed, params, factors)
    return decayed
