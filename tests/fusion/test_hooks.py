"""Hooks on the stacked modules of a FusedEnsemble run once per forward with member-first tensors: what each
member's own hook sees, stacked along dim 0 (see fused_ensemble/layer_hooks.py)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from fused_ensemble import FusedEnsemble
from fused_ensemble.cli.models import CifarResNet18

from member_factories import assert_matches, make_members, member_loop


def resnet_members(n: int = 2, seed: int = 0):
    return make_members(lambda: CifarResNet18(width=8), n=n, seed=seed)


def record_calls(module: nn.Module, calls: list) -> None:
    module.register_forward_hook(lambda m, args, out: calls.append((args[0].detach().clone(), out.detach().clone())))


def assert_seen_by_members(fused_calls: list, member_calls: list, n: int) -> None:
    """The fused hook's calls, each ``[N, ...]``, equal the members' calls (member after member) stacked."""
    per_member = len(member_calls) // n
    assert len(fused_calls) == per_member > 0
    for call, (fused_input, fused_output) in enumerate(fused_calls):
        member_inputs = [member_calls[i * per_member + call][0] for i in range(n)]
        member_outputs = [member_calls[i * per_member + call][1] for i in range(n)]
        assert_matches(fused_input, torch.stack(member_inputs))
        assert_matches(fused_output, torch.stack(member_outputs))


@pytest.mark.parametrize("path", ["conv1", "layer2.0.conv1", "layer3.1.bn2", "linear", "layer1", "layer2.0",
                                  "layer2.0.shortcut", "layer4"])
@pytest.mark.parametrize("member_inputs", [False, True], ids=["shared", "member_inputs"])
def test_forward_hook_sees_the_members_values_stacked(path, member_inputs):
    members = resnet_members()
    fused = FusedEnsemble(members, reduction="none", member_inputs=member_inputs)
    fused_calls, member_calls = [], []
    record_calls(fused.stacked.get_submodule(path), fused_calls)
    for member in members:
        record_calls(member.get_submodule(path), member_calls)
    x = torch.randn(2, 3, 3, 16, 16) if member_inputs else torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert_matches(fused(x), member_loop(members, x, member_inputs))
    assert_seen_by_members(fused_calls, member_calls, 2)


def test_a_module_called_twice_fires_twice():
    # torchvision's BasicBlock calls its one nn.ReLU twice: a parameter-free layer, run as itself on fused layouts.
    members = make_members(lambda: torchvision.models.resnet18(num_classes=5), n=2, seed=1)
    fused = FusedEnsemble(members, reduction="none")
    fused_calls, member_calls = [], []
    record_calls(fused.stacked.layer1[0].relu, fused_calls)
    for member in members:
        record_calls(member.layer1[0].relu, member_calls)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused(x), member_loop(members, x)
    assert len(fused_calls) == 2
    assert_seen_by_members(fused_calls, member_calls, 2)


@pytest.mark.parametrize("path", ["layer2.0.bn1", "layer3"])
def test_a_hook_that_returns_a_value_replaces_the_output(path):
    members = resnet_members(seed=2)
    fused = FusedEnsemble(members, reduction="mean_probs")
    for module in [fused.stacked.get_submodule(path)] + [m.get_submodule(path) for m in members]:
        module.register_forward_hook(lambda m, args, out: out.flip(-1) * 0.5)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = member_loop(members, x).softmax(-1).mean(0)
        assert_matches(fused(x), expected)


def test_pre_hooks_and_keyword_hooks_on_a_layer():
    members = resnet_members(seed=3)
    fused = FusedEnsemble(members, reduction="none")

    def double_input(module, args):
        return args[0] * 2

    def add_one(module, args, kwargs):
        return (args[0] + 1,), kwargs

    def keyword_hook(module, args, kwargs, out):
        assert kwargs == {}
        return out - 1

    for root in [fused.stacked] + members:
        root.layer2[0].conv1.register_forward_pre_hook(double_input)
        root.layer2[0].conv2.register_forward_pre_hook(add_one, with_kwargs=True)
        root.layer3[0].bn1.register_forward_hook(keyword_hook, with_kwargs=True)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert_matches(fused(x), member_loop(members, x))


def test_container_pre_hooks_observe_but_cannot_replace_the_input():
    members = resnet_members(seed=4)
    fused = FusedEnsemble(members, reduction="none")
    seen = []
    handle = fused.stacked.layer3.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        fused(x)
    assert seen == [torch.Size([2, 3, 16, 8, 8])]  # [N, B, C, H, W]: layer2 gives 2 * width channels
    handle.remove()
    fused.stacked.layer3.register_forward_pre_hook(lambda m, args: args[0] * 2)
    with pytest.raises(TypeError, match="'layer3'.*returned new inputs.*first layer"):
        fused(x)


def test_gradients_through_a_hook_registered_on_the_output():
    # Backward hooks are refused; a forward hook can hook the member-first output's gradient instead.
    members = make_members(lambda: CifarResNet18(width=8), n=2, seed=5, training=True)
    fused = FusedEnsemble(members, reduction="none")
    grads = {}

    def hook_gradient(key):
        def hook(module, args, out):
            out.register_hook(lambda g: grads.setdefault(key, g.clone()))
        return hook

    fused.stacked.layer2.register_forward_hook(hook_gradient("fused"))
    for index, member in enumerate(members):
        member.layer2.register_forward_hook(hook_gradient(index))
    x = torch.randn(3, 3, 16, 16)
    fused(x).square().sum().backward()
    member_loop(members, x).square().sum().backward()
    assert_matches(grads["fused"], torch.stack([grads[0], grads[1]]))


def test_hooks_where_they_cannot_run_raise():
    members = resnet_members(seed=6)
    x = torch.randn(1, 3, 16, 16)
    cases = [
        (lambda f: f.stacked.register_forward_hook(lambda *a: None), "the stacked root module"),
        (lambda f: f.stacked.layer1[0].shortcut.register_forward_hook(lambda *a: None), "'layer1.0.shortcut'"),
        (lambda f: f.stacked.conv1.register_full_backward_hook(lambda *a: None), "backward hook.*'conv1'"),
        (lambda f: f.stacked.layer1.register_full_backward_pre_hook(lambda *a: None), "'layer1'"),
    ]
    for register, message in cases:
        fused = FusedEnsemble(members, reduction="none")
        register(fused)
        with pytest.raises(TypeError, match=message):
            fused(x)


def test_hooks_on_layers_of_the_generic_paths_fire_once():
    # Bilinear runs as vmap(functional_call) and MultiheadAttention through its call rule: neither may fire the
    # hook again from inside (with batched or fused tensors).
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
            self.bilinear = nn.Bilinear(8, 8, 4)

        def forward(self, x):
            y, _ = self.attention(x, x, x)
            return self.bilinear(y, x)

    members = make_members(Net, n=3, seed=7)
    fused = FusedEnsemble(members, reduction="none")
    seen = {"attention": [], "bilinear": []}
    member_seen = {"attention": [], "bilinear": []}
    for name in seen:
        fused.stacked.get_submodule(name).register_forward_hook(
            lambda m, args, out, name=name: seen[name].append(out[0] if isinstance(out, tuple) else out))
        for member in members:
            member.get_submodule(name).register_forward_hook(
                lambda m, args, out, name=name: member_seen[name].append(out[0] if isinstance(out, tuple) else out))
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        assert_matches(fused(x), member_loop(members, x))
    for name in seen:
        assert len(seen[name]) == 1
        assert_matches(seen[name][0], torch.stack(member_seen[name]))


def test_optimize_refuses_hooks():
    fused = FusedEnsemble(resnet_members(seed=8))
    handle = fused.stacked.layer4.register_forward_hook(lambda *a: None)
    with pytest.raises(TypeError, match="'layer4'.*remove them before optimize"):
        fused.optimize(torch.randn(1, 3, 16, 16))
    handle.remove()
    fused.optimize(torch.randn(1, 3, 16, 16))
