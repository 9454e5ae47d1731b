"""The convolution rules (grouped and transposed convolutions) against the member loop."""

from __future__ import annotations

import pytest
from torch import nn

from layer_checks import check_layer

# ---- convolutions --------------------------------------------------------------------------------------------

CONVOLUTIONS = {
    "conv2d": (lambda: nn.Conv2d(3, 4, 3), (3, 9, 9)),
    "conv2d-stride-pad-nobias": (lambda: nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=False), (3, 9, 9)),
    "conv2d-same-dilation": (lambda: nn.Conv2d(3, 4, 3, padding="same", dilation=2), (3, 9, 8)),
    "conv2d-same-even-kernel": (lambda: nn.Conv2d(3, 4, (2, 4), padding="same"), (3, 7, 8)),
    "conv2d-groups": (lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), (4, 7, 7)),
    "conv2d-depthwise": (lambda: nn.Conv2d(4, 8, 3, groups=4, stride=2, bias=False), (4, 9, 9)),
    "conv2d-reflect": (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (3, 8, 8)),
    "conv2d-circular-asymmetric": (
        lambda: nn.Conv2d(3, 4, 3, stride=(1, 2), padding=(1, 2), padding_mode="circular"), (3, 8, 8)),
    "conv2d-replicate-same-groups": (
        lambda: nn.Conv2d(4, 4, 3, padding="same", padding_mode="replicate", groups=2), (4, 6, 6)),
    "conv1d-stride-pad": (lambda: nn.Conv1d(3, 4, 5, stride=2, padding=2), (3, 11)),
    "conv1d-groups-dilation-circular-same": (
        lambda: nn.Conv1d(4, 6, 3, groups=2, dilation=2, padding="same", padding_mode="circular"), (4, 10)),
    "conv1d-reflect-nobias": (lambda: nn.Conv1d(3, 5, 3, padding=1, padding_mode="reflect", bias=False), (3, 7)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 3, padding=1, stride=(1, 2, 2)), (2, 4, 5, 5)),
    "conv-transpose2d": (lambda: nn.ConvTranspose2d(3, 4, 3, stride=2), (3, 5, 5)),
    "conv-transpose2d-groups-outpad-dilation-nobias": (
        lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=2, bias=False),
        (4, 5, 6)),
    "conv-transpose1d": (lambda: nn.ConvTranspose1d(3, 2, 3, padding=1), (3, 6)),
    "conv-transpose3d-stride": (lambda: nn.ConvTranspose3d(2, 3, 2, stride=(1, 2, 2)), (2, 3, 4, 4)),
}


@pytest.mark.parametrize("position", ["first-layer", "after-conv"])
@pytest.mark.parametrize("name", CONVOLUTIONS)
def test_convolution(name, position):
    """``first-layer``: the conv reads the (shared) input itself; ``after-conv``: it reads a channel-packed
    activation of all members (the grouped-conv path)."""
    make_conv, shape = CONVOLUTIONS[name]

    def factory():
        conv = make_conv()
        if position == "first-layer":
            return nn.Sequential(conv)
        pointwise = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[len(conv.kernel_size) - 1]
        return nn.Sequential(pointwise(conv.in_channels, conv.in_channels, 1), nn.Tanh(), conv)
    check_layer(factory, shape)
