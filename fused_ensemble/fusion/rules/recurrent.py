"""nn.RNN / nn.LSTM / nn.GRU in a fused ensemble: each member's recurrence on its own weights, member by member.

The recurrent kernels (cuDNN's, oneDNN's, ATen's) take one set of weights per call, and vmap has no batching rule
for them, so this is the one layer family that runs as a loop over members: member i's slice of every stacked
weight goes through ``torch.func.functional_call`` of the layer, with its own input and initial state. The rest of
the network stays fused around it, and the results are each member's own (dropout between layers included,
drawn per member). The stacked layer never packs its weights (``flatten_parameters`` would treat the ``[N, ...]``
stacks as one layer's, see fused_ensemble.fusion.stacking); on CUDA each call then uses the weights as they are,
which torch warns about once.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils._pytree import tree_map

from fused_ensemble.fusion.layout import Layout, to_member
from fused_ensemble.fusion.rules.registry import FusionContext, LayerCall, Rule, register


def fused_call(module: nn.RNNBase, layer_call: LayerCall, n: int):
    """``module(input, hx)`` for all members, member by member: ``((output, h_n or (h_n, c_n)), Layout.MEMBER)``."""
    call, layout_of = layer_call.bind(inspect.signature(type(module).forward), module)
    x, hx = call["input"], call["hx"]
    if isinstance(x, PackedSequence) or isinstance(hx, PackedSequence):
        raise TypeError(f"{type(module).__name__} in a FusedEnsemble takes padded tensors, not a PackedSequence")
    x = to_member(x, layout_of["input"], n)
    if hx is not None:  # a tensor, or LSTM's (h_0, c_0); its layouts mirror it
        hx = tree_map(lambda t, layout: to_member(t, layout, n), hx, layout_of["hx"])
    stacked = dict(module.named_parameters())
    outputs = []
    for member in range(n):
        params = {name: p[member] for name, p in stacked.items()}
        member_args = (x[member],) if hx is None else (x[member], tree_map(lambda t: t[member], hx))
        outputs.append(torch.func.functional_call(module, params, member_args))
    return tree_map(lambda *leaves: torch.stack(leaves), outputs[0], *outputs[1:]), Layout.MEMBER


class RecurrentRule(Rule):
    def __call__(self, module: nn.RNNBase, call: LayerCall, ctx: FusionContext):
        return fused_call(module, call, ctx.num_members)


register(RecurrentRule(), nn.RNNBase)
