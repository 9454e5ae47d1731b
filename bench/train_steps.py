"""One training step (forward, backward, SGD step) of N members, three ways, shared by the training benchmark
(test_bench_train.py) and its profile (profile_train_step.py):

- ``loop``: the members one after another, summed loss, one backward, one ``torch.optim.SGD(fused=True)`` over
  every member's parameters (torch's one-pass kernel: over 4 ResNet-18 members on the 2-core CPU 13.9 ms against
  24.7 for its default, bench/test_bench_optim.py): the strongest plain-PyTorch loop;
- ``vmap``: ``torch.func.stack_module_state`` + ``functional_call`` under ``torch.vmap``,
  ``torch.optim.SGD(fused=True)`` on the stacked leaves. vmap cannot update BatchNorm running statistics in place,
  so its BatchNorm layers run without them (``replace_all_batch_norm_modules_``): it does a little less work than
  the others;
- ``fused``: ``FusedEnsemble(..., reduction="none", member_inputs=True)`` + ``fused_ensemble.optim.SGD``;
- ``fused_compile`` (not in the default set: compiling takes minutes): the same with its forward and loss under
  ``torch.compile(fullgraph=True)`` (inductor fuses the BatchNorm, ReLU and residual elementwise work; the
  convolutions stay cuDNN/oneDNN calls).

Each builder takes the members (modules in train mode on the step's device) and returns ``step(x, y)`` for
``x: [N, B, ...]`` and ``y: [N, B]``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from fused_ensemble import FusedEnsemble, conv_backward, member_cross_entropy, optim
from fused_ensemble.cli.models import build_model, input_shape

IMPLEMENTATIONS = ("loop", "vmap", "fused")
SGD_ARGS = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)


def build_members(n: int, device: str, model: str = "resnet18-cifar", classes: int = 10,
                  memory_format: torch.memory_format = torch.contiguous_format) -> list[torch.nn.Module]:
    """N members in train mode; ``memory_format=torch.channels_last`` lays their 4-D weights out NHWC (feed
    channels_last inputs too: the steps keep whatever layout the convolutions pick)."""
    torch.manual_seed(0)
    return [build_model(model, classes).to(device, memory_format=memory_format).train() for _ in range(n)]


def member_batch(members: int, batch: int, device: str, model: str = "resnet18-cifar", classes: int = 10,
                 memory_format: torch.memory_format = torch.contiguous_format) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs ``x: [N, B, ...]`` and labels ``y: [N, B]``; channels_last lays every member's
    ``[B, C, H, W]`` slice out NHWC."""
    x = torch.randn(members, batch, *input_shape(model), device=device)
    if memory_format == torch.channels_last:
        x = x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    return x, torch.randint(0, classes, (members, batch), device=device)


def training_call(step, x, y, device: str, autocast: bool):
    """``step(x, y)`` as a no-argument call with autograd on (timers run under no_grad), under
    ``torch.autocast(bfloat16)`` if asked."""
    def run():
        with torch.enable_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            step(x, y)
    return run


def loop_step(members):
    opt = torch.optim.SGD([p for m in members for p in m.parameters()], **SGD_ARGS, fused=True)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = sum(F.cross_entropy(m(x[i]), y[i]) for i, m in enumerate(members))
        loss.backward()
        opt.step()
    return step


def vmap_step(members):
    members = [copy.deepcopy(m) for m in members]
    for m in members:
        torch.func.replace_all_batch_norm_modules_(m)
    params, buffers = torch.func.stack_module_state(members)
    base = copy.deepcopy(members[0]).to("meta")
    opt = torch.optim.SGD(list(params.values()), **SGD_ARGS, fused=True)

    def member_loss(p, b, xi, yi):
        return F.cross_entropy(torch.func.functional_call(base, (p, b), (xi,)), yi)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        # randomness="different": each member draws its own dropout masks, as the loop's and fused's members do
        torch.vmap(member_loss, randomness="different")(params, buffers, x, y).sum().backward()
        opt.step()
    return step


def fused_step(members, compile: bool = False, conv_backward_mode: str = "grouped"):
    """The fused training step; ``conv_backward_mode="per_member"`` runs the convolutions' backward as N dense
    ones (fused_ensemble.conv_backward, experimental)."""
    fused = FusedEnsemble(members, reduction="none", member_inputs=True).train()
    opt = optim.SGD(fused.parameters(), **SGD_ARGS)

    def loss_of(x, y):
        return member_cross_entropy(fused(x), y)

    if conv_backward_mode != "grouped":
        plain_loss_of = loss_of

        def loss_of(x, y):
            with conv_backward(conv_backward_mode):  # the choice is made in the forward
                return plain_loss_of(x, y)

    if compile:
        loss_of = torch.compile(loss_of, fullgraph=True)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss_of(x, y).backward()
        opt.step()
    return step


BUILDERS = {"loop": loop_step, "vmap": vmap_step, "fused": fused_step,
            "fused_compile": lambda members: fused_step(members, compile=True),
            "fused_member_backward": lambda members: fused_step(members, conv_backward_mode="per_member")}


def parse_implementations(parser, text: str) -> tuple[str, ...]:
    """A comma-separated ``--implementations`` value, checked against BUILDERS (``parser.error`` otherwise)."""
    implementations = tuple(text.split(","))
    unknown = [name for name in implementations if name not in BUILDERS]
    if unknown:
        parser.error(f"unknown implementations {unknown}; expected some of {sorted(BUILDERS)}")
    return implementations
