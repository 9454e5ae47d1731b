"""Members must agree in everything but tensor values: every module's non-tensor state (its ``__dict__`` less
nn.Module's own bookkeeping), compared structurally. A member that differs, carries hooks or runs in another mode is
refused with its index, the module path and the attribute; identical configurations fuse, including torchvision's
per-model ``functools.partial`` norm layers and config objects; ``to_members()`` gives back what went in."""

from __future__ import annotations

import copy
import functools
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fused_ensemble import FusedEnsemble

from member_factories import assert_matches, assert_state_equal, clone_state, make_members, member_loop


class Encoder(nn.Module):
    def __init__(self, nhead: int = 2, activation: str = "relu", norm_first: bool = False):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, nhead, dim_feedforward=16, dropout=0.0, activation=activation,
                                           norm_first=norm_first, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.encoder(x))


class Attention(nn.Module):
    def __init__(self, num_heads: int = 2, batch_first: bool = True):
        super().__init__()
        self.attention = nn.MultiheadAttention(8, num_heads, batch_first=batch_first)

    def forward(self, x):
        return self.attention(x, x, x, need_weights=False)[0]


class Scaled(nn.Module):
    """A forward that reads plain Python attributes and a tensor that is neither parameter nor buffer."""

    def __init__(self, scale: float = 2.0, shift: bool = True, offset=None):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.scale = scale
        self.shift = shift
        self.offset = torch.arange(4.0) if offset is None else offset

    def forward(self, x):
        y = self.fc(x) * self.scale
        return y + self.offset if self.shift else y


def refused(members, error=ValueError) -> str:
    with pytest.raises(error) as raised:
        FusedEnsemble(members)
    return str(raised.value)


def test_multihead_attention_with_another_number_of_heads():
    members = [Encoder(2), Encoder(2), Encoder(2), Encoder(4)]
    assert refused(members) == ("member 3: 'encoder.layers.0.self_attn' (MultiheadAttention) has num_heads=4, "
                                "member 0 has 2")


def test_multihead_attention_with_another_batch_first():
    message = refused([Attention(), Attention(batch_first=False)])
    assert message == "member 1: 'attention' (MultiheadAttention) has batch_first=False, member 0 has True"


@pytest.mark.parametrize("changed, expected", [
    (dict(activation="gelu"), "'encoder.layers.0' (TransformerEncoderLayer) has activation_relu_or_gelu=2, "
                              "member 0 has 1"),
    (dict(norm_first=True), "'encoder.layers.0' (TransformerEncoderLayer) has norm_first=True, member 0 has False"),
], ids=["activation", "norm_first"])
def test_transformer_encoder_layer_configuration(changed, expected):
    assert refused([Encoder(), Encoder(**changed)]) == "member 1: " + expected


def test_transformer_encoder_layer_activation_function():
    gelu = Encoder()
    gelu.encoder.layers[0].activation = F.gelu  # same relu-or-gelu flag, another function
    assert refused([Encoder(), gelu]) == ("member 1: 'encoder.layers.0' (TransformerEncoderLayer) has "
                                          "activation=torch._C._nn.gelu, member 0 has "
                                          "torch.nn.functional.relu")


@pytest.mark.parametrize("member, expected", [
    (lambda: Scaled(scale=3.0), "has scale=3.0, member 0 has 2.0"),
    (lambda: Scaled(scale=2), "has scale=2 (int), member 0 has 2.0 (float)"),
    (lambda: Scaled(shift=False), "has shift=False, member 0 has True"),
    (lambda: Scaled(offset=torch.arange(4.0) + 1), "has offset=tensor([1., 2., 3., 4.]), member 0 has "
                                                   "tensor([0., 1., 2., 3.])"),
    (lambda: Scaled(offset=torch.zeros(5)), "has offset=a tensor of shape (5,), member 0 has a tensor of shape "
                                            "(4,)"),
], ids=["float", "int-for-float", "flag", "tensor-values", "tensor-shape"])
def test_plain_attributes_the_forward_reads(member, expected):
    assert refused([Scaled(), member()]) == "member 1: the root module (Scaled) " + expected


def test_an_attribute_only_one_member_has():
    extra = Scaled()
    extra.fc.temperature = 0.5
    assert refused([Scaled(), extra]) == ("member 1: 'fc' (Linear) has temperature=0.5, member 0 has no attribute "
                                          "temperature")
    assert refused([extra, Scaled()]) == ("member 1: 'fc' (Linear) has no attribute temperature, member 0 has "
                                          "temperature=0.5")


@pytest.mark.parametrize("register", [
    lambda m: m.fc.register_forward_hook(lambda *args: None),
    lambda m: m.fc.register_forward_pre_hook(lambda *args: None),
    lambda m: m.fc.register_full_backward_hook(lambda *args: None),
], ids=["forward", "pre", "backward"])
@pytest.mark.parametrize("hooked", [0, 1])
def test_hooks_on_the_members_are_refused(register, hooked):
    members = [Scaled(), Scaled()]
    register(members[hooked])
    message = refused(members, TypeError)
    assert message.startswith(f"member {hooked}: 'fc' (Linear) has a ")
    assert "fused.stacked.get_submodule('fc')" in message


def test_a_hook_on_the_root_module_is_refused():
    member = Scaled()
    member.register_forward_hook(lambda *args: None)
    assert "member 1: the root module (Scaled) has a forward hook" in refused([Scaled(), member], TypeError)


def test_members_in_mixed_modes_are_refused():
    assert refused([Scaled().train(), Scaled().eval()]) == (
        "member 1: the root module (Scaled) is in eval mode, member 0 is in train mode; put every member in one mode "
        "(.train() or .eval()) before fusing")
    frozen = Encoder().train()
    frozen.encoder.layers[0].dropout.eval()
    assert refused([Encoder().train(), frozen]).startswith(
        "member 1: 'encoder.layers.0.dropout' (Dropout) is in eval mode, member 0 is in train mode")


def test_set_member_refuses_another_configuration():
    fused = FusedEnsemble([Attention(), Attention()])
    with pytest.raises(ValueError, match=re.escape("member 1: 'attention' (MultiheadAttention) has num_heads=4, "
                                                   "the members have 2")):
        fused.set_member(1, Attention(num_heads=4))
    fused.set_member(1, Attention())  # the stacked recurrent and attention layers' own state does not get in the way


class Configured(nn.Module):
    """State made per instance that is nevertheless the same configuration: a partial, a config object, a lambda
    closing over a number, a NaN, a dict and a tensor constant."""

    class Config:
        def __init__(self, width: int):
            self.width = width
            self.names = ["a", "b"]

    def __init__(self, factor: float = 2.0):
        super().__init__()
        self.norm_layer = functools.partial(nn.LayerNorm, eps=1e-6)
        self.config = self.Config(4)
        self.gate = lambda x: x * factor
        self.threshold = float("nan")
        self.options = {"mode": "fast", "sizes": (1, 2)}
        self.constant = torch.tensor([1.0, float("nan")])
        self.fc = nn.Linear(4, 4)
        self.norm = self.norm_layer(4)

    def forward(self, x):
        return self.norm(self.gate(self.fc(x)))


def test_identical_configurations_made_per_instance_fuse():
    members = make_members(Configured, n=3)
    x = torch.randn(2, 4)
    with torch.no_grad():
        assert_matches(FusedEnsemble(members, reduction="none")(x), member_loop(members, x))


@pytest.mark.parametrize("change, expected", [
    (lambda m: setattr(m, "norm_layer", functools.partial(nn.LayerNorm, eps=1e-5)),
     "has norm_layer.keywords['eps']=1e-05, member 0 has 1e-06"),
    (lambda m: setattr(m.config, "width", 8), "has config.width=8, member 0 has 4"),
    (lambda m: m.config.names.append("c"), "has config.names=['a', 'b', 'c'], member 0 has ['a', 'b']"),
    (None, "has gate.<closure factor>=3.0, member 0 has 2.0"),
    (lambda m: setattr(m, "gate", torch.sigmoid), "has gate=torch.sigmoid, member 0 has "),
    (lambda m: m.options.update(mode="slow"), "has options['mode']='slow', member 0 has 'fast'"),
], ids=["partial", "config-object", "config-list", "closure", "function", "dict"])
def test_differences_inside_configuration_objects(change, expected):
    member = Configured(factor=3.0) if change is None else Configured()
    if change is not None:
        change(member)
    assert refused([Configured(), member]).startswith("member 1: the root module (Configured) " + expected)


def test_modules_kept_outside_the_module_tree_are_compared_by_value():
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.side = [nn.Linear(4, 4)]  # not registered: not stacked, so member 0's would run for all

        def forward(self, x):
            return self.side[0](self.fc(x))

    assert "member 1: the root module (Holder) has side[0]._parameters['weight']=" in refused([Holder(), Holder()])


def test_recurrent_members_fuse():
    # An RNN keeps its parameters in a list and as weak references too: compared by which parameter they are.
    members = make_members(lambda: nn.Sequential(nn.GRU(4, 5, num_layers=2, batch_first=True)), n=2)
    FusedEnsemble(members)
    other = nn.Sequential(nn.GRU(4, 5, num_layers=2, batch_first=True)).eval()
    other[0]._flat_weights = list(reversed(other[0]._flat_weights))
    assert "has _flat_weights[0]=parameter '0.bias_hh_l1', member 0 has parameter '0.weight_ih_l0'" in refused(
        [members[0], other])


def own_state_names(module: nn.Module) -> list[str]:
    """The names in a module's ``__dict__`` that are not nn.Module's own bookkeeping."""
    return [name for name in vars(module) if name not in vars(nn.Module())]


MEMBER_KINDS = {
    "configured": Configured,
    "encoder": Encoder,
    "gru": lambda: nn.Sequential(nn.GRU(4, 5, batch_first=True), nn.Identity()),
    "mobilenet_v3": lambda: __import__("torchvision").models.mobilenet_v3_small(num_classes=4),
    "swin": lambda: __import__("torchvision").models.swin_t(num_classes=4),
}


@pytest.mark.parametrize("kind", MEMBER_KINDS)
def test_to_members_gives_back_what_went_in(kind):
    members = make_members(MEMBER_KINDS[kind], n=2)
    originals = copy.deepcopy(members)
    fused = FusedEnsemble(members, reduction="none")
    handle = fused.stacked.register_forward_pre_hook(lambda *args: None)  # the fused module's, not the members'
    for unfused, original in zip(fused.to_members(), originals):
        assert_state_equal(unfused.state_dict(), clone_state(original))
        ours, theirs = dict(unfused.named_modules()), dict(original.named_modules())
        assert list(ours) == list(theirs)
        for path, module in ours.items():
            assert module.training == theirs[path].training
            assert not (module._forward_hooks or module._forward_pre_hooks), path
        for path, module in ours.items():
            assert own_state_names(module) == own_state_names(theirs[path]), path
        FusedEnsemble([original, unfused])  # and the configuration check finds no value to tell apart
    handle.remove()
