"""FusedEnsemble on whole architectures against the member loop, the reductions, and the module behaviour
(round trip to members, state_dict, dtype, modes, torch.compile)."""

from __future__ import annotations

import copy
import functools
import io

import pytest
import torch
from torch import nn

from fused_ensemble import FusedEnsemble
from fused_ensemble.cli.models import LeNet5, build_model, input_shape
from fused_ensemble.ops.reductions import REDUCTIONS
from fused_ensemble.ops.reference import reduce_reference

from member_factories import assert_matches, assert_state_equal, clone_state, make_members, member_loop

# (architecture, image shape of one sample; None: the model's own). The torchvision classifiers run on
# smaller images than 224x224 here (their adaptive pooling allows it) to keep the CPU tests fast.
ARCHITECTURES = [
    pytest.param("mlp", None, id="mlp"),
    pytest.param("lenet", None, id="lenet"),
    pytest.param("resnet18-cifar", None, id="resnet18-cifar"),
    pytest.param("vit-cifar", None, id="vit-cifar"),
    pytest.param("resnet18", (3, 64, 64), id="resnet18"),
    pytest.param("resnet50", (3, 64, 64), id="resnet50", marks=pytest.mark.slow),
    pytest.param("vgg11_bn", (3, 32, 32), id="vgg11_bn", marks=pytest.mark.slow),
    pytest.param("mobilenet_v2", (3, 64, 64), id="mobilenet_v2"),
]
SMALL_ARCHITECTURES = ["mlp", "lenet", "resnet18-cifar"]


@functools.cache
def eval_members(name: str, n: int = 2) -> tuple[nn.Module, ...]:
    """Randomized eval-mode members of one architecture, built once per test run (the tests never change them:
    FusedEnsemble copies its members)."""
    return tuple(make_members(lambda: build_model(name), n=n, seed=1))


def sample_input(shape, batch: int, n: int, member_inputs: bool) -> torch.Tensor:
    return torch.randn((n, batch, *shape) if member_inputs else (batch, *shape))


@pytest.mark.parametrize("member_inputs", [False, True], ids=["shared", "member_inputs"])
@pytest.mark.parametrize("name, shape", ARCHITECTURES)
def test_architecture_matches_member_loop(name, shape, member_inputs):
    members = eval_members(name)
    x = sample_input(shape or input_shape(name), batch=2, n=len(members), member_inputs=member_inputs)
    fused = FusedEnsemble(members, reduction="none", member_inputs=member_inputs)
    assert not fused.training
    with torch.no_grad():
        out = fused(x)
        ref = member_loop(members, x, member_inputs)
    assert_matches(out, ref)


@pytest.mark.parametrize("member_inputs", [False, True], ids=["shared", "member_inputs"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", SMALL_ARCHITECTURES)
def test_reduction_matches_reduced_member_loop(name, reduction, member_inputs):
    members = make_members(lambda: build_model(name), n=3, seed=2)
    x = sample_input(input_shape(name), batch=3, n=3, member_inputs=member_inputs)
    fused = FusedEnsemble(members, reduction=reduction, member_inputs=member_inputs)
    with torch.no_grad():
        out = fused(x)
        ref = reduce_reference(member_loop(members, x, member_inputs), reduction, dim=0)
    assert out.shape == (3, 10)
    assert_matches(out, ref)


@pytest.mark.slow
def test_resnet18_at_224_default_reduction():
    """The torchvision input size once, with the deep-ensemble default reduction (mean of member softmaxes)."""
    members = eval_members("resnet18")
    x = torch.randn(1, *input_shape("resnet18"))
    fused = FusedEnsemble(members)
    assert fused.reduction == "mean_probs"
    with torch.no_grad():
        out = fused(x)
        ref = reduce_reference(member_loop(members, x), "mean_probs")
    assert out.shape == (1, 1000)
    assert_matches(out, ref)


def _vit_tiny() -> nn.Module:
    import torchvision

    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=16, mlp_dim=32, num_classes=10)


# Not in models.py: the fusion is a general mechanism, and these stress channel concatenation (SqueezeNet,
# DenseNet), channel shuffles (ShuffleNet), squeeze-excitation (MobileNetV3, EfficientNet), grouped convs
# (RegNet), permutes and a layer-scale parameter (ConvNeXt), window attention (Swin) and attention (ViT).
OTHER_TORCHVISION = [
    pytest.param("squeezenet1_1", 64, id="squeezenet1_1"),
    pytest.param("densenet121", 32, id="densenet121"),
    pytest.param("shufflenet_v2_x0_5", 64, id="shufflenet_v2_x0_5"),
    pytest.param("mobilenet_v3_small", 64, id="mobilenet_v3_small"),
    pytest.param("efficientnet_b0", 64, id="efficientnet_b0"),
    pytest.param("regnet_x_400mf", 64, id="regnet_x_400mf"),
    pytest.param("convnext_tiny", 64, id="convnext_tiny"),
    pytest.param("swin_t", 64, id="swin_t"),
    pytest.param("vit_tiny", 32, id="vit_tiny"),
]


@pytest.mark.parametrize("name, size", OTHER_TORCHVISION)
def test_other_torchvision_classifiers_match_member_loop(name, size):
    import torchvision

    factory = _vit_tiny if name == "vit_tiny" else lambda: getattr(torchvision.models, name)(num_classes=10)
    members = make_members(factory, n=2, seed=14)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = FusedEnsemble(members, reduction="none")(x)
        assert_matches(out, member_loop(members, x))


def test_mean_reduction_of_a_regression_output():
    """``"mean"`` averages any output, not only logits: here [B, 3, 4] per member."""
    factory = lambda: nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Unflatten(1, (3, 4)))  # noqa: E731
    members = make_members(factory, n=3, seed=3)
    x = torch.randn(2, 5)
    with torch.no_grad():
        out = FusedEnsemble(members, reduction="mean")(x)
        assert_matches(out, member_loop(members, x).mean(0))


# ---- round trip, state_dict, dtype, modes --------------------------------------------------------------------

def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 3 * 3, 5))


def test_to_members_is_bitwise_round_trip():
    members = make_members(small_cnn, n=3, seed=4)
    expected = [clone_state(m) for m in members]
    fused = FusedEnsemble(members)
    assert fused.num_members == 3
    unfused = fused.to_members()
    assert len(unfused) == 3
    for member, original, state in zip(unfused, members, expected):
        assert type(member) is type(original)
        assert member.training == original.training
        assert_state_equal(member.state_dict(), state)
        assert [n for n, _ in member.named_parameters()] == [n for n, _ in original.named_parameters()]


def test_to_members_after_an_optimizer_step_returns_the_fused_slices():
    members = make_members(small_cnn, n=2, seed=5)
    before = [clone_state(m) for m in members]
    fused = FusedEnsemble(members, reduction="log_mean_probs").train()
    optimizer = torch.optim.SGD(fused.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        x, y = torch.randn(4, 3, 14, 14), torch.randint(0, 5, (4,))
        loss = nn.functional.nll_loss(fused(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    fused_state = fused.state_dict()
    for index, member in enumerate(fused.to_members()):
        state = member.state_dict()
        assert_state_equal(state, {name: fused_state["stacked." + name][index] for name in state})
        changed = [name for name in state if not torch.equal(state[name], before[index][name])]
        # Every parameter moved and every BatchNorm buffer was updated by the training step.
        assert set(changed) == set(state), f"unchanged after training: {set(state) - set(changed)}"
    # The original members are copies: training the fused module leaves them alone.
    for member, state in zip(members, before):
        assert_state_equal(member.state_dict(), state)


def test_to_members_are_independent_of_the_fused_module():
    fused = FusedEnsemble(make_members(small_cnn, n=2, seed=6))
    member = fused.to_members()[1]
    snapshot = clone_state(member)
    with torch.no_grad():
        for parameter in fused.parameters():
            parameter.add_(1.0)
    assert_state_equal(member.state_dict(), snapshot)


def test_later_changes_to_members_do_not_reach_the_fused_module():
    members = make_members(small_cnn, n=2, seed=7)
    x = torch.randn(2, 3, 14, 14)
    fused = FusedEnsemble(members, reduction="none")
    with torch.no_grad():
        before = fused(x)
        members[0][0].weight.add_(1.0)
        assert torch.equal(fused(x), before)


def test_state_dict_save_and_load_into_a_fresh_fused_module():
    fused = FusedEnsemble(make_members(small_cnn, n=3, seed=8), reduction="softmax_of_mean")
    buffer = io.BytesIO()
    torch.save(fused.state_dict(), buffer)
    buffer.seek(0)
    fresh = FusedEnsemble(make_members(small_cnn, n=3, seed=9), reduction="softmax_of_mean")
    x = torch.randn(3, 3, 14, 14)
    with torch.no_grad():
        assert not torch.equal(fresh(x), fused(x))
        fresh.load_state_dict(torch.load(buffer, weights_only=True))
        assert torch.equal(fresh(x), fused(x))
    assert_state_equal(fresh.state_dict(), fused.state_dict())
    assert all(key.startswith("stacked.") for key in fused.state_dict())


def test_deepcopy_runs_its_own_weights_and_buffers():
    # deepcopy shares functions: a copy whose fused graphs were copied along would keep running the original's
    # layers through their closures (and update the original's BatchNorm statistics in train mode).
    fused = FusedEnsemble(make_members(small_cnn, n=2, seed=14), reduction="none")
    x = torch.randn(3, 3, 14, 14)
    with torch.no_grad():
        before = fused(x)  # the original's graphs have run
        state = clone_state(fused)
        copied = copy.deepcopy(fused)
        for parameter in copied.parameters():
            parameter.mul_(0.5)
        assert_matches(copied(x), member_loop(copied.to_members(), x))
        assert not torch.allclose(copied(x), before)
        copied.train()(x)
        assert_state_equal(fused.state_dict(), state)
        assert torch.equal(fused(x), before)


def test_whole_module_torch_save_round_trip():
    fused = FusedEnsemble(make_members(small_cnn, n=2, seed=15), reduction="log_mean_probs", member_inputs=True)
    x = torch.randn(2, 3, 3, 14, 14)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert (loaded.num_members, loaded.reduction, loaded.member_inputs) == (2, "log_mean_probs", True)
    with torch.no_grad():
        assert torch.equal(loaded(x), fused(x))
        expected = fused(x)
        for parameter in loaded.parameters():
            parameter.add_(0.1)
        assert_matches(loaded(x), reduce_reference(member_loop(loaded.to_members(), x, member_inputs=True),
                                                   "log_mean_probs"))
        assert torch.equal(fused(x), expected)


def test_averaged_model_keeps_an_ema_of_every_member():
    # torch.optim.swa_utils.AveragedModel deep-copies the module: one EMA model of the whole ensemble.
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    fused = FusedEnsemble(make_members(small_cnn, n=2, seed=16, training=True), reduction="log_mean_probs")
    ema = AveragedModel(fused, multi_avg_fn=get_ema_multi_avg_fn(0.5))
    optimizer = torch.optim.SGD(fused.parameters(), lr=0.5)
    x, y = torch.randn(4, 3, 14, 14), torch.tensor([0, 1, 2, 3])
    average = None
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.nll_loss(fused(x), y).backward()
        optimizer.step()
        ema.update_parameters(fused)
        current = [p.detach().clone() for p in fused.parameters()]
        average = current if average is None else [0.5 * a + 0.5 * c for a, c in zip(average, current)]
    for averaged, expected in zip(ema.module.parameters(), average):
        assert_matches(averaged, expected)
    fused.eval(), ema.eval()
    with torch.no_grad():
        expected_out = reduce_reference(member_loop(ema.module.to_members(), x), "log_mean_probs")
        assert_matches(ema(x), expected_out)
        assert not torch.allclose(ema(x), fused(x))


def test_optimized_ensemble_refuses_to_be_copied():
    fused = FusedEnsemble(make_members(small_cnn, n=2, seed=17))
    optimized = fused.optimize(torch.randn(2, 3, 14, 14))
    with pytest.raises(TypeError, match="cannot be copied or pickled"):
        copy.deepcopy(optimized)
    with pytest.raises(TypeError, match="call optimize\\(\\) on the copy"):
        torch.save(optimized, io.BytesIO())


def test_to_float64():
    members = make_members(small_cnn, n=2, seed=10)
    fused = FusedEnsemble(members, reduction="log_mean_probs").to(torch.float64)
    assert all(p.dtype == torch.float64 for p in fused.parameters())
    x = torch.randn(2, 3, 14, 14, dtype=torch.float64)
    with torch.no_grad():
        out = fused(x)
        ref = reduce_reference(member_loop([m.double() for m in members], x), "log_mean_probs")
    assert out.dtype == torch.float64
    assert_matches(out, ref, rel=1e-12)


def test_to_channels_last_lays_out_each_member_slice():
    # nn.Module.to(memory_format=channels_last) on the [N, O, I, kh, kw] stacks would raise (rank 5); each member's
    # slice must be laid out as the member's own weight is, so that the grouped weight is channels_last too.
    members = make_members(small_cnn, n=3, seed=19, training=True)
    fused = FusedEnsemble(members, reduction="none", member_inputs=True).to(memory_format=torch.channels_last)
    loop = [m.to(memory_format=torch.channels_last) for m in members]
    weight = fused.stacked[0].weight
    assert all(weight[i].is_contiguous(memory_format=torch.channels_last) for i in range(3))
    assert weight.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)
    assert fused.stacked[-1].weight.is_contiguous()  # 2-D Linear weights keep their layout, as nn.Module.to does
    assert all(m[0].weight.is_contiguous(memory_format=torch.channels_last) for m in fused.to_members())
    x = torch.randn(3, 4, 14, 14, 3).permute(0, 1, 4, 2, 3)  # every member's [B, C, H, W] slice NHWC
    y = torch.randint(0, 5, (3, 4))
    from fused_ensemble import optim

    fused_optimizer = optim.SGD(fused.parameters(), lr=0.1, momentum=0.9)
    loop_optimizer = torch.optim.SGD([p for m in loop for p in m.parameters()], lr=0.1, momentum=0.9)
    for _ in range(2):
        fused_optimizer.zero_grad(), loop_optimizer.zero_grad()
        out, expected = fused(x), member_loop(loop, x, member_inputs=True)  # one train forward each
        assert_matches(out, expected)
        torch.nn.functional.cross_entropy(out.flatten(0, 1), y.flatten()).backward()
        torch.nn.functional.cross_entropy(expected.flatten(0, 1), y.flatten()).backward()
        fused_optimizer.step(), loop_optimizer.step()
    for index, member in enumerate(fused.to_members()):
        for name, value in member.state_dict().items():
            assert_matches(value.double(), loop[index].state_dict()[name].double())
    assert weight[0].is_contiguous(memory_format=torch.channels_last)  # the optimizer kept the layout
    fused.to(torch.float64, memory_format=torch.contiguous_format)
    assert weight.dtype == torch.float64 and weight.is_contiguous()


def test_to_channels_last_3d_and_a_format_of_the_wrong_rank():
    members = [nn.Sequential(nn.Conv3d(2, 4, 3), nn.Flatten()) for _ in range(2)]
    fused = FusedEnsemble(members, reduction="none").to(memory_format=torch.channels_last_3d)
    assert fused.stacked[0].weight[1].is_contiguous(memory_format=torch.channels_last_3d)
    x = torch.randn(2, 2, 5, 5, 5)
    assert_matches(fused(x), member_loop(members, x))
    with pytest.raises(RuntimeError, match="rank 4"):  # as members[0].to(memory_format=torch.channels_last)
        fused.to(memory_format=torch.channels_last)


def test_train_eval_switch_follows_members_mode():
    members = make_members(small_cnn, n=2, seed=11)
    x = torch.randn(4, 3, 14, 14)
    fused = FusedEnsemble(members, reduction="none")
    assert not fused.training and not fused.stacked.training
    assert FusedEnsemble([m.train() for m in make_members(small_cnn, n=2)]).training
    with torch.no_grad():
        eval_out = fused(x)
        assert_matches(eval_out, member_loop(members, x))
        fused.train()
        assert fused.training and all(m.training for m in fused.stacked.modules())
        train_out = fused(x)  # batch statistics: differs from eval
        assert_matches(train_out, member_loop([m.train() for m in members], x))
        assert not torch.allclose(train_out, eval_out)
        fused.eval()
        for m in members:
            m.eval()
        assert_matches(fused(x), member_loop(members, x))
    assert all(not m.training for m in fused.to_members())


def test_parameters_are_the_stacked_member_parameters():
    members = make_members(small_cnn, n=3, seed=12)
    fused = FusedEnsemble(members)
    member_parameters = dict(members[0].named_parameters())
    fused_parameters = dict(fused.named_parameters())
    assert len(list(fused.parameters())) == len(list(members[0].parameters()))
    assert list(fused_parameters) == ["stacked." + name for name in member_parameters]
    for name, parameter in member_parameters.items():
        stacked = fused_parameters["stacked." + name]
        assert stacked.shape == (3, *parameter.shape) and stacked.requires_grad
        for index, member in enumerate(members):
            assert torch.equal(stacked[index], member.get_parameter(name))
    assert len(list(fused.buffers())) == len(list(members[0].buffers()))


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    members = make_members(LeNet5, n=2, seed=13)
    fused = FusedEnsemble(members, reduction="mean_probs")
    x = torch.randn(2, 1, 28, 28)
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True)
    with torch.no_grad():
        assert_matches(compiled(x), fused(x))
        assert_matches(fused(x), reduce_reference(member_loop(members, x), "mean_probs"))


@pytest.mark.parametrize("optimized", [False, True], ids=["fused", "optimized"])
def test_torch_export_with_a_dynamic_batch(optimized):
    members = make_members(small_cnn, n=3, seed=18)
    fused = FusedEnsemble(members, reduction="mean_probs")
    x = torch.randn(4, 3, 14, 14)
    module = fused.optimize(x) if optimized else fused
    batch = torch.export.Dim("batch", min=2)
    # FusedEnsemble.forward takes *inputs (one spec per input, in a tuple); OptimizedEnsemble.forward takes x.
    shapes = ({0: batch},) if optimized else (({0: batch},),)
    program = torch.export.export(module, (x,), dynamic_shapes=shapes)
    other = torch.randn(7, 3, 14, 14)
    with torch.no_grad():
        assert_matches(program.module()(other), reduce_reference(member_loop(members, other), "mean_probs"))


class KeywordMember(nn.Module):
    """A member whose forward takes keyword inputs: an optional padding mask (a tensor) and a scale (a number)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x, padding_mask=None, scale: float = 1.0):
        return self.head(self.encoder(x, src_key_padding_mask=padding_mask)) * scale


@pytest.mark.parametrize("member_inputs", [False, True], ids=["shared", "member_inputs"])
def test_keyword_inputs_reach_the_members(member_inputs):
    members = make_members(KeywordMember, n=3, seed=20)
    fused = FusedEnsemble(members, reduction="none", member_inputs=member_inputs)
    lead = (3, 2) if member_inputs else (2,)
    x = torch.randn(*lead, 5, 8)
    mask = torch.zeros(*lead, 5, dtype=torch.bool)
    mask[..., -2:] = True

    def loop(**keywords):
        return torch.stack([m(x[i] if member_inputs else x,
                              **{k: (v[i] if member_inputs and isinstance(v, torch.Tensor) else v)
                                 for k, v in keywords.items()}) for i, m in enumerate(members)])

    with torch.no_grad():
        assert_matches(fused(x, padding_mask=mask, scale=2.0), loop(padding_mask=mask, scale=2.0))
        assert_matches(fused(x, mask, scale=0.5), loop(padding_mask=mask, scale=0.5))
        assert_matches(fused(x), loop())  # the defaults
    with pytest.raises(TypeError, match="multiple values for argument 'padding_mask'"):
        fused(x, mask, padding_mask=mask)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['temperature'\]"):
        fused(x, temperature=2.0)
    if member_inputs:
        with pytest.raises(ValueError, match="expects input padding_mask of shape \\[N, B, ...\\]"):
            fused(x, padding_mask=mask[0])


def test_forward_frees_each_activation_after_its_last_use():
    # A deep MLP: holding every intermediate value until the output (as the graph runner once did) keeps ~2 tensors
    # per layer alive; dropping each after its last reader keeps a handful, whatever the depth.
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    class PeakLiveTensors(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.outputs = []
            self.peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.outputs.append(weakref.ref(t))
            self.peak = max(self.peak, sum(ref() is not None for ref in self.outputs))
            return out

    depth = 24
    members = [nn.Sequential(*[layer for _ in range(depth) for layer in (nn.Linear(16, 16), nn.ReLU())])
               for _ in range(3)]
    fused = FusedEnsemble(members, reduction="none").eval()
    x = torch.randn(5, 16)
    with torch.no_grad(), PeakLiveTensors() as mode:
        out = fused(x)
    assert out.shape == (3, 5, 16)
    assert mode.peak <= 8, f"{mode.peak} intermediate tensors alive at once for {2 * depth} layers"
