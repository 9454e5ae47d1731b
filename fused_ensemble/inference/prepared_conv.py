"""An inference-only convolution of N members with its weights laid out once, and a choice of how to run it.

Grouped convolutions are not always the fastest way to run N members' convolutions: oneDNN and cuDNN sometimes
run N dense convolutions faster than one grouped one (pytorch#73764). ``PreparedConv`` can run either way;
``autotune`` times both on the real input once and keeps the faster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fused_ensemble.fusion.layout import Layout, to_channel, to_member
from fused_ensemble.fusion.rules.registry import FusionContext, layer_rule
from fused_ensemble.inference.timing import median, time_ms

STRATEGIES = ("grouped", "per_member")


class PreparedConv(nn.Module):
    """N members' convolution (from a stacked ``nn.Conv*d``) with flattened ``[N * C_out, C_in / g, *k]`` weights."""

    def __init__(self, conv: nn.modules.conv._ConvNd, memory_format: torch.memory_format = torch.contiguous_format):
        super().__init__()
        self.num_members = conv.weight.shape[0]
        weight = conv.weight.detach().flatten(0, 1)
        if weight.dim() == 4:
            weight = weight.contiguous(memory_format=memory_format)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", conv.bias.detach().flatten() if conv.bias is not None else None)
        self.functional = (F.conv1d, F.conv2d, F.conv3d)[len(conv.kernel_size) - 1]
        self.stride, self.dilation, self.groups = conv.stride, conv.dilation, conv.groups
        self.padding, self.padding_mode = conv.padding, conv.padding_mode
        self.reversed_padding = conv._reversed_padding_repeated_twice
        self.strategy = "grouped"
        self.autotune_reps = 0  # > 0: the next call times every strategy this many times and keeps the fastest

    def extra_repr(self) -> str:
        return f"members={self.num_members}, weight={tuple(self.weight.shape)}, strategy={self.strategy!r}"

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, object]:
        if self.padding_mode == "zeros":
            return x, self.padding
        return F.pad(x, self.reversed_padding, mode=self.padding_mode), 0

    def _grouped(self, x: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, Layout]:
        x, padding = self._pad(to_channel(x, layout, self.num_members))
        y = self.functional(x, self.weight, self.bias, self.stride, padding, self.dilation,
                            self.num_members * self.groups)
        return y, Layout.CHANNEL

    def _per_member(self, x: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, Layout]:
        # Member-first in and out: when the previous layer ran this way too, every member's input is one
        # contiguous [B, C, ...] block, so the dense convolutions read it without a copy.
        n = self.num_members
        x = to_member(x, layout, n)
        weights = self.weight.chunk(n)
        biases = self.bias.chunk(n) if self.bias is not None else [None] * n
        outputs = []
        for xi, w, b in zip(x.unbind(0), weights, biases):
            xi, padding = self._pad(xi)
            outputs.append(self.functional(xi, w, b, self.stride, padding, self.dilation, self.groups))
        return torch.stack(outputs), Layout.MEMBER

    def forward_fused(self, x: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, Layout]:
        if layout is Layout.SHARED and self.groups == 1 and self.padding_mode == "zeros":
            self.autotune_reps = 0  # one dense convolution for all members: nothing to choose
            y = self.functional(x, self.weight, self.bias, self.stride, self.padding, self.dilation, 1)
            return y, Layout.CHANNEL
        if self.autotune_reps > 0:
            self.strategy = self._fastest(x, layout)
            self.autotune_reps = 0
        run = self._grouped if self.strategy == "grouped" else self._per_member
        return run(x, layout)

    def _fastest(self, x: torch.Tensor, layout: Layout) -> str:
        """Times both strategies on this input, layout conversion included."""
        timings = {}
        for strategy, run in (("grouped", self._grouped), ("per_member", self._per_member)):
            timings[strategy] = median(time_ms(lambda: run(x, layout), x.device.type, self.autotune_reps))
        return min(timings, key=timings.get)


@layer_rule(PreparedConv)
def prepared_conv(module: PreparedConv, x: torch.Tensor, layout: Layout, ctx: FusionContext):
    return module.forward_fused(x, layout)
