"""Benchmark workloads: N random members of a zoo architecture, an input batch, and every way of running them
(the member loop, ``torch.func`` vmap, its ``torch.compile``, ``FusedEnsemble`` and ``optimize()``), each including
the ensemble reduction."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from fused_ensemble import cpu_memory
from fused_ensemble.cli.models import build_model, input_shape
from fused_ensemble.fused import FusedEnsemble
from fused_ensemble.ops.reference import reduce_reference


def best_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
              "float16": torch.float16, "fp16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(dtypes)}")
    return dtypes[name]


def randomize_state(module: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Gives ``module`` random normalization state and replaces constant-initialized parameters, in place, so that
    no layer is close to the identity and nothing hides behind zeros (for benchmarks and tests).

    Affine normalization parameters get weights in [0.5, 1.5] and biases around 0; BatchNorm running means
    around 0, running variances in [0.5, 2] and a random ``num_batches_tracked`` (except with ``momentum=None``,
    whose cumulative average needs every member to have seen the same number of batches). Any other parameter
    whose entries are all equal (zero biases, unit scales) is redrawn around its value.
    """
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
                if getattr(sub, "weight", None) is not None:
                    sub.weight.copy_(0.5 + torch.rand(sub.weight.shape, generator=generator))
                if getattr(sub, "bias", None) is not None:
                    sub.bias.copy_(0.2 * torch.randn(sub.bias.shape, generator=generator))
            if isinstance(sub, nn.modules.batchnorm._NormBase) and sub.running_mean is not None:
                sub.running_mean.copy_(0.2 * torch.randn(sub.running_mean.shape, generator=generator))
                sub.running_var.copy_(0.5 + 1.5 * torch.rand(sub.running_var.shape, generator=generator))
                if sub.momentum is not None:
                    sub.num_batches_tracked.fill_(int(torch.randint(1, 1000, (), generator=generator)))
        for parameter in module.parameters():
            if parameter.numel() > 1 and bool((parameter == parameter.flatten()[0]).all()):
                noise = 0.1 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
                parameter.add_(noise)
    return module


@dataclass
class Workload:
    """N random members of one architecture, an input batch, and the three ways to run them."""

    model: str
    num_members: int
    batch: int
    device: str
    dtype: torch.dtype
    reduction: str = "mean_probs"
    members: list[nn.Module] = field(default_factory=list)
    x: torch.Tensor | None = None

    @classmethod
    def build(cls, model: str, num_members: int, batch: int, device: str, dtype: torch.dtype,
              reduction: str = "mean_probs", seed: int = 0) -> Workload:
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        members = [randomize_state(build_model(model), generator).eval().to(device, dtype)
                   for _ in range(num_members)]
        x = torch.randn(batch, *input_shape(model), generator=generator).to(device, dtype)
        settle_cpu_allocator(device)
        return cls(model, num_members, batch, device, dtype, reduction, members, x)

    def loop(self) -> Callable[[], torch.Tensor]:
        members, x, reduction = self.members, self.x, self.reduction
        return lambda: reduce_reference(torch.stack([m(x) for m in members]), reduction)

    def vmap(self) -> Callable[[], torch.Tensor]:
        params, buffers = torch.func.stack_module_state(self.members)
        base = copy.deepcopy(self.members[0]).to("meta")

        def one_member(p, b, x):
            return torch.func.functional_call(base, (p, b), (x,))

        run = torch.vmap(one_member, in_dims=(0, 0, None))
        x, reduction = self.x, self.reduction
        return lambda: reduce_reference(run(params, buffers, x), reduction)

    def vmap_compiled(self) -> Callable[[], torch.Tensor]:
        """``vmap()`` under ``torch.compile`` (default mode, static shapes): compiled on the first call, which
        the caller's warm-up should absorb. Raises whatever torch.compile raises where the model does not
        compile."""
        return torch.compile(self.vmap(), dynamic=False)

    def fused(self) -> Callable[[], torch.Tensor]:
        module = FusedEnsemble(self.members, reduction=self.reduction).eval()
        x = self.x
        return lambda: module(x)

    def optimized(self, compile: bool = False) -> Callable[[], torch.Tensor]:
        module = FusedEnsemble(self.members, reduction=self.reduction).eval().optimize(self.x, compile=compile)
        x = self.x
        return lambda: module(x)


def settle_cpu_allocator(device: str) -> None:
    """Makes the CPU allocator setting (fused_ensemble.cpu_memory, opt-in for library users) before anything is timed
    on the CPU, so that every implementation, the baselines (member loop, vmap, eager reductions, torch.optim)
    included, is timed with the same allocator, whose N-times-larger temporaries would otherwise be mmapped and
    page-faulted in on every call. Result files record it (``environment.cpu_allocator``)."""
    if str(device).startswith("cpu"):
        cpu_memory.retain_freed_cpu_memory()


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))
