"""The linear rule (batched matmuls) against the member loop."""

from __future__ import annotations

import pytest
from torch import nn

from layer_checks import check_layer

# ---- linear --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sample_shape", [(6,), (4, 6), (2, 3, 6)], ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear(sample_shape, bias):
    check_layer(lambda: nn.Sequential(nn.Linear(6, 5, bias=bias), nn.GELU(), nn.Linear(5, 4, bias=bias)),
                sample_shape)


def test_linear_after_convolution_and_flatten():
    check_layer(lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5)),
                (2, 6, 6))
