"""Temperature scaling of an ensemble, fitted on held-out member logits.

``TemperatureScaling(mode)`` learns how much to soften (T > 1) or sharpen (T < 1) the ensemble's predictive
distribution by minimizing the negative log-likelihood of held-out examples (Guo et al., 2017), with LBFGS over
``log T`` (so that T stays positive). Two modes, which scale different things:

- ``"ensemble"``: one temperature for the ensemble's log-probabilities. The calibrated distribution is
  ``softmax(log_mean_probs / T)``, where ``log_mean_probs = log(mean_n softmax(logits_n))`` is the ensemble's
  ``"log_mean_probs"`` reduction: the members are averaged first, then the average is tempered ("pool, then
  calibrate").
- ``"member"``: one temperature per member, applied to that member's logits before averaging. The calibrated
  distribution is ``mean_n softmax(logits_n / T_n)``; the N temperatures are fitted jointly, on the NLL of that
  average (not each on its own member's NLL: members calibrated one by one make an underconfident ensemble).

Both reduce with ``fused_ensemble.ensemble_reduce``. The NLL has a minimum at a finite temperature only if the
held-out examples contain mistakes: where every example is classified correctly (mode ``"ensemble"``), or where a
member classifies every example correctly (mode ``"member"``, that member's T), sharpening always lowers the NLL and
its infimum lies at T -> 0. A fit there would return whatever tiny T the optimizer stopped at, an ensemble that is
certain of every prediction and pays for it on the first mistake; ``fit`` raises ``NoFiniteTemperature`` instead.
Hold out more examples, or do without temperature scaling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fused_ensemble.ops.ensemble_reduce import ensemble_reduce

__all__ = ["TemperatureScaling", "NoFiniteTemperature", "MODES"]

MODES = ("ensemble", "member")
"""What ``TemperatureScaling`` scales: the ensemble's log-probabilities (one T) or each member's logits (N)."""


class NoFiniteTemperature(ValueError):
    """The held-out NLL has no minimum at a finite temperature: it keeps falling as T -> 0 (no mistakes to
    penalize sharpening)."""


def _always_right(log_probs: Tensor, targets: Tensor) -> Tensor:
    """Per leading index of ``log_probs [..., B, K]``: whether the target is an argmax in every one of the B rows
    (then sharpening never lowers the target's probability: d log p_y / d(1/T) = z_y - E_p[z] >= 0)."""
    target = log_probs.gather(-1, targets.expand(*log_probs.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    return (target >= log_probs.max(-1).values).all(-1)


def _check_logits(logits, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() < 2:
        raise TypeError(f"{name} must be a floating-point tensor of member logits [N, ..., K] (member dim first)")
    if logits.shape[0] == 0 or logits.shape[-1] == 0:
        raise ValueError(f"{name} of shape {tuple(logits.shape)} have no members or no classes")


def _check_targets(logits: Tensor, targets) -> Tensor:
    if logits.dim() != 3:
        raise ValueError(f"fit takes member logits [N, B, K], got shape {tuple(logits.shape)}")
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32, torch.uint8):
        raise TypeError("targets must be an integer tensor of class indices, shape [B]")
    if targets.shape != logits.shape[1:2]:
        raise ValueError(f"targets of shape {tuple(targets.shape)} do not match logits of shape "
                         f"{tuple(logits.shape)} (expected [B] against [N, B, K])")
    if targets.numel() == 0:
        raise ValueError("fit needs at least one example (B = 0)")
    if int(targets.min()) < 0 or int(targets.max()) >= logits.shape[-1]:
        raise ValueError(f"targets must lie in [0, {logits.shape[-1] - 1}] (K = {logits.shape[-1]} classes)")
    return targets.long()


class TemperatureScaling:
    """Temperature scaling of an ensemble's predictive distribution (see the module doc for what each mode scales).

    Args:
        mode: ``"ensemble"`` (one temperature T: ``softmax(log_mean_probs / T)``) or ``"member"`` (one T_n per
            member: ``mean_n softmax(logits_n / T_n)``).
        max_iter: LBFGS iterations of the fit (each one a few NLL evaluations).

    Example::

        >>> scaling = TemperatureScaling("ensemble").fit(held_out_logits, held_out_targets)  # [N, B, K], [B]
        >>> probs = scaling(test_logits)  # calibrated ensemble probabilities [B', K]
        >>> scaling.state_dict()  # {'temperature': T}: plain floats, JSON-serializable
    """

    def __init__(self, mode: str = "ensemble", max_iter: int = 100):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(map(repr, MODES))}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
        self.mode = mode
        self.max_iter = max_iter
        self._temperature: Tensor | None = None  # float64: [] (ensemble) or [N] (member)

    @property
    def temperature(self) -> float | Tensor:
        """The fitted temperature: a float (mode ``"ensemble"``) or a float64 tensor ``[N]`` (mode ``"member"``)."""
        if self._temperature is None:
            raise RuntimeError("TemperatureScaling is not fitted: call fit(logits, targets) or load_state_dict()")
        return self._temperature.item() if self.mode == "ensemble" else self._temperature.clone()

    def fit(self, logits: Tensor, targets: Tensor) -> TemperatureScaling:
        """Fits the temperature(s) on held-out member logits ``[N, B, K]`` and their targets ``[B]`` by minimizing
        the NLL of the calibrated ensemble distribution with LBFGS (strong Wolfe line search) over ``log T``,
        starting from T = 1, in float64. Returns ``self``.

        Raises:
            NoFiniteTemperature: (a ``ValueError``) the NLL has no minimum at a finite temperature: every held-out
                example is classified correctly by the ensemble (mode ``"ensemble"``) or by some member (mode
                ``"member"``; the error names them). See the module doc."""
        _check_logits(logits)
        targets = _check_targets(logits, targets).to(logits.device)
        x = logits.detach().to(torch.float64)
        self._check_finite_minimum(x, targets)
        if self.mode == "ensemble":
            log_mean_probs = ensemble_reduce(x, "log_mean_probs")  # does not depend on T: reduced once
            log_t = torch.zeros((), dtype=torch.float64, device=x.device, requires_grad=True)

            def log_probs(temperature: Tensor) -> Tensor:
                return torch.log_softmax(log_mean_probs / temperature, -1)
        else:
            log_t = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device, requires_grad=True)

            def log_probs(temperature: Tensor) -> Tensor:
                return ensemble_reduce(x / temperature.view(-1, 1, 1), "log_mean_probs")
        optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=self.max_iter, tolerance_grad=1e-10,
                                      tolerance_change=1e-14, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = F.nll_loss(log_probs(log_t.exp()), targets)
            loss.backward()
            return loss

        optimizer.step(closure)
        temperature = log_t.detach().exp()
        if not torch.isfinite(temperature).all():
            raise RuntimeError(f"the temperature fit diverged (T = {temperature.tolist()}); are the logits finite?")
        self._temperature = temperature.cpu()
        return self

    def _check_finite_minimum(self, x: Tensor, targets: Tensor) -> None:
        examples = targets.shape[0]
        if self.mode == "ensemble":
            if _always_right(ensemble_reduce(x, "log_mean_probs"), targets):
                raise NoFiniteTemperature(
                    f"the ensemble classifies all {examples} held-out examples correctly, so its NLL keeps falling as "
                    f"T -> 0 and has no minimum at a finite temperature; hold out more examples (the fit needs some "
                    f"mistakes), or do without temperature scaling")
            return
        members = _always_right(x, targets).nonzero().flatten().tolist()
        if members:
            raise NoFiniteTemperature(
                f"member(s) {members} classify all {examples} held-out examples correctly, so the NLL keeps falling "
                f"as their temperatures go to 0 and has no minimum at finite temperatures; hold out more examples "
                f"(the fit needs some mistakes of every member), use mode 'ensemble', or do without temperature "
                f"scaling")

    def __call__(self, logits: Tensor) -> Tensor:
        """Calibrated ensemble probabilities of member logits ``[N, ..., K]`` (member dim first): ``[..., K]``,
        float32 (float64 for float64 logits), by ``ensemble_reduce``."""
        _check_logits(logits)
        temperature = self._checked_temperature(logits.shape[0])
        x = logits.detach()
        if self.mode == "ensemble":
            return torch.softmax(ensemble_reduce(x, "log_mean_probs") / temperature.item(), -1)
        scale = temperature.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        return ensemble_reduce(x / scale, "mean_probs")

    def _checked_temperature(self, members: int) -> Tensor:
        if self._temperature is None:
            raise RuntimeError("TemperatureScaling is not fitted: call fit(logits, targets) or load_state_dict()")
        if self.mode == "member" and self._temperature.numel() != members:
            raise ValueError(f"the temperatures were fitted for {self._temperature.numel()} members, the logits have "
                             f"{members} (member dim first)")
        return self._temperature

    def state_dict(self) -> dict:
        """The fitted values as plain floats (JSON-serializable): ``{"temperature": T}`` (mode ``"ensemble"``) or
        ``{"temperature": [T_0, ..., T_{N-1}]}`` (mode ``"member"``)."""
        temperature = self.temperature
        return {"temperature": temperature if self.mode == "ensemble" else temperature.tolist()}

    def load_state_dict(self, state: dict) -> None:
        """Loads what ``state_dict()`` returned (for the same mode): a float, or a list of floats, all positive."""
        if not isinstance(state, dict) or set(state) != {"temperature"}:
            raise ValueError(f"expected a dict with the one key 'temperature', got {state!r}")
        value = state["temperature"]
        if self.mode == "ensemble" and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
            raise TypeError(f"mode 'ensemble' loads one float temperature, got {value!r}")
        if self.mode == "member" and not (isinstance(value, (list, tuple)) and value
                                          and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  for v in value)):
            raise TypeError(f"mode 'member' loads a list of floats (one temperature per member), got {value!r}")
        temperature = torch.tensor(value, dtype=torch.float64)
        if not (torch.isfinite(temperature) & (temperature > 0)).all():
            raise ValueError(f"temperatures must be finite and positive, got {value!r}")
        self._temperature = temperature

    def __repr__(self) -> str:
        fitted = "not fitted" if self._temperature is None else f"temperature={self.state_dict()['temperature']}"
        return f"TemperatureScaling(mode={self.mode!r}, {fitted})"
