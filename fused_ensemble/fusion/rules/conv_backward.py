"""Experimental: a grouped convolution whose backward runs as N dense convolution backwards, one per member.

The fused training step runs each convolution as one grouped convolution over the N members' channels. cuDNN's
grouped backward was measured much slower than the dense backwards of the member loop on an H100 (NHWC, bf16;
bench/NOTES.md, "Training"). This keeps the
grouped forward and computes the backward with ``aten.convolution_backward`` on each member's channel slices: the
dense kernels, at the price of N launches and of copying strided slices. Whether that wins is a GPU measurement
(``bench/train_throughput.py --implementations fused,fused_member_backward``); on a CPU oneDNN's grouped backward
is as fast as the dense ones, so the convolution rule uses it only inside
``fused_ensemble.conv_backward("per_member")`` (see ``fused_ensemble.config``).

Gradients equal the grouped backward's to rounding. Double backward is not supported.
"""

from __future__ import annotations

import torch


def grouped_conv_with_per_member_backward(functional, x: torch.Tensor, weight: torch.Tensor,
                                          bias: torch.Tensor | None, stride, padding, dilation, groups: int,
                                          n: int) -> torch.Tensor:
    """``functional(x, weight, bias, stride, padding, dilation, n * groups)`` (x ``[B, N * C_in, ...]``, weight
    ``[N * C_out, C_in / groups, ...]``), differentiated member by member. ``padding`` must be numbers."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # Autocast would cast inside the Function's forward only, leaving its backward the float32 tensors it
        # saved: cast here, so that the casts' own backward takes the gradients back to float32.
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    return _PerMemberBackward.apply(x, weight, bias, functional, stride, padding, dilation, groups, n)


class _PerMemberBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, functional, stride, padding, dilation, groups, n):
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, padding, dilation, groups, n)
        ctx.has_bias = bias is not None
        return functional(x, weight, bias, stride, padding, dilation, n * groups)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, n = ctx.conv
        spatial = x.dim() - 2
        c_in, c_out = x.shape[1] // n, weight.shape[0] // n
        need_input, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        memory_format = _memory_format(x)
        grad_x = torch.empty_like(x, memory_format=memory_format) if need_input else None
        grad_w = torch.empty_like(weight) if need_weight else None

        def expand(v):
            return list(v) if isinstance(v, (tuple, list)) else [v] * spatial
        for member in range(n):
            inputs = slice(member * c_in, (member + 1) * c_in)
            outputs = slice(member * c_out, (member + 1) * c_out)
            # cuDNN and oneDNN want dense operands: the channel slices of a packed tensor are strided.
            member_x = x[:, inputs].contiguous(memory_format=memory_format)
            member_grad = grad_out[:, outputs].contiguous(memory_format=memory_format)
            gx, gw, _ = torch.ops.aten.convolution_backward(
                member_grad, member_x, weight[outputs], None, expand(stride), expand(padding), expand(dilation),
                False, [0] * spatial, groups, [need_input, need_weight, False])
            if need_input:
                grad_x[:, inputs] = gx
            if need_weight:
                grad_w[outputs] = gw
        grad_b = grad_out.sum([0, *range(2, grad_out.dim())]) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format
