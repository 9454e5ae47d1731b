"""The recurrent rule (RNN, LSTM, GRU member by member, the rest fused around them) against the member loop."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fused_ensemble import FusedEnsemble

from layer_checks import check_outputs_and_grads, draw_input
from member_factories import assert_matches, make_members


class Recurrent(nn.Module):
    """An RNN / LSTM / GRU after a Linear; returns the sequence output and the final states."""

    def __init__(self, kind: str, with_state: bool = False, batch_first: bool = True, **layer):
        super().__init__()
        self.kind, self.with_state, self.batch_first = kind, with_state, batch_first
        self.encoder = nn.Linear(6, 8)
        self.rnn = getattr(nn, kind)(8, 5, batch_first=batch_first, **layer)
        self.states = layer.get("num_layers", 1) * (2 if layer.get("bidirectional") else 1)
        self.h_size = layer.get("proj_size") or 5
        # initial states from the data: h_0 [layers * directions, B, h_size], c_0 (LSTM) [..., 5]
        self.h0_proj = nn.Linear(6, self.states * self.h_size)
        self.c0_proj = nn.Linear(6, self.states * 5)

    def forward(self, x):
        h = self.encoder(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        if not self.with_state:
            result = self.rnn(h)
        else:
            first = x[:, 0]
            h0 = torch.tanh(self.h0_proj(first)).unflatten(-1, (self.states, self.h_size)).transpose(0, 1)
            if self.kind == "LSTM":
                c0 = torch.tanh(self.c0_proj(first)).unflatten(-1, (self.states, 5)).transpose(0, 1)
                result = self.rnn(h, (h0.contiguous(), c0.contiguous()))
            else:
                result = self.rnn(h, h0.contiguous())
        out, state = result[0], result[1]  # torch.fx cannot unpack a layer's output
        if self.kind == "LSTM":
            return out, state[0], state[1]
        return out, state


RECURRENT_CASES = {
    "lstm": dict(kind="LSTM"),
    "lstm-2-layers-bidirectional-state": dict(kind="LSTM", num_layers=2, bidirectional=True, with_state=True),
    "lstm-proj-seq-first-state": dict(kind="LSTM", proj_size=3, batch_first=False, with_state=True),
    "gru-state": dict(kind="GRU", with_state=True),
    "gru-2-layers-seq-first": dict(kind="GRU", num_layers=2, batch_first=False),
    "rnn-relu-bidirectional-state": dict(kind="RNN", nonlinearity="relu", bidirectional=True, with_state=True),
}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(RECURRENT_CASES))
def test_recurrent_layers(case, training):
    """Outputs and final states, and every gradient, against the member loop."""
    check_outputs_and_grads(lambda: Recurrent(**RECURRENT_CASES[case]), (4, 6), training, seed=13)


def test_recurrent_members_come_back_as_ordinary_layers():
    members = make_members(lambda: Recurrent("LSTM", num_layers=2), n=2, seed=14)
    fused = FusedEnsemble(copy.deepcopy(members), reduction="none")
    unfused = fused.to_members()[1]
    assert "flatten_parameters" not in unfused.rnn.__dict__  # packs its weights again (on CUDA)
    assert all(w is getattr(unfused.rnn, name) for w, name in zip(unfused.rnn._flat_weights,
                                                                  unfused.rnn._flat_weights_names))
    x = draw_input((4, 6), False)
    for ours, theirs in zip(unfused(x), members[1](x)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.gpu
def test_recurrent_layers_on_cuda():
    """On CUDA the stacked layer must not pack its [N, ...] weights (moving it there would), and each member's call
    runs cuDNN on that member's slices."""
    members = [m.cuda() for m in make_members(lambda: Recurrent("LSTM", num_layers=2, with_state=True), n=3,
                                                  seed=15)]
    fused = FusedEnsemble(copy.deepcopy(members), reduction="none", member_inputs=True).cuda()
    x = draw_input((4, 6), True, n=3).cuda()
    with torch.no_grad():
        for out, ref in zip(fused(x), [torch.stack(parts) for parts in zip(*[m(x[i]) for i, m in
                                                                              enumerate(members)])]):
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_recurrent_layers_under_torch_compile_fullgraph():
    """Dynamo traces recurrent layers only with allow_rnn (for the members too): then the fused ensemble compiles.
    (config.patch, not monkeypatch: setting the option back by hand leaves torch.export unable to read it.)"""
    members = make_members(lambda: Recurrent("GRU", with_state=True), n=2, seed=17)
    fused = FusedEnsemble(members, reduction="none")
    x = draw_input((4, 6), False)
    torch._dynamo.reset()
    with torch.no_grad(), torch._dynamo.config.patch(allow_rnn=True):
        for out, ref in zip(torch.compile(fused, fullgraph=True)(x), [torch.stack(p) for p in zip(*[m(x) for m in
                                                                                                  members])]):
            assert_matches(out, ref)
