"""The benchmark model zoo: member architectures for the bench and train commands, the benchmarks and the tests
(random initialization, no downloads)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class MLP(nn.Module):
    """A 3-layer perceptron with BatchNorm and dropout, for flat inputs of ``in_features``."""

    def __init__(self, in_features: int = 784, hidden: int = 256, num_classes: int = 10, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.net(x)


class LeNet5(nn.Module):
    """LeNet-5 for 1x28x28 (or 1x32x32) images, with max pooling and ReLU."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes))

    def forward(self, x):
        x = self.features(x)
        return self.classifier(torch.flatten(x, 1))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet18(nn.Module):
    """The CIFAR ResNet-18 (3x3 stem, no max pool, 32x32 inputs) of Kuang Liu's pytorch-cifar."""

    def __init__(self, num_classes: int = 10, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, in_planes = [], width
        for planes, stride in [(width, 1), (2 * width, 2), (4 * width, 2), (8 * width, 2)]:
            layers.append(nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(8 * width, num_classes)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = nn.functional.adaptive_avg_pool2d(out, 1)
        return self.linear(out.flatten(1))


def small_cnn(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """A small CNN (the digits member): three 3x3 conv + BatchNorm + ReLU layers, one max pool, global average
    pooling and a linear head; any image size of at least 2x2."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, num_classes),
    )


def _torchvision(name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int = 1000) -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    return build


def cifar_vit(num_classes: int = 10) -> nn.Module:
    """A small Vision Transformer for 32x32 images (torchvision's VisionTransformer: 4x4 patches, 6 layers of width
    256, 8 heads, MLP width 512; 3.2M parameters), the transformer counterpart of CIFAR ResNet-18."""
    import torchvision

    return torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=6, num_heads=8, hidden_dim=256,
                                                mlp_dim=512, num_classes=num_classes)


# name -> (constructor taking num_classes, input shape of one sample)
MODELS: dict[str, tuple[Callable[..., nn.Module], tuple[int, ...]]] = {
    "mlp": (lambda num_classes=10: MLP(num_classes=num_classes), (1, 28, 28)),
    "lenet": (lambda num_classes=10: LeNet5(num_classes=num_classes), (1, 28, 28)),
    "resnet18-cifar": (lambda num_classes=10: CifarResNet18(num_classes=num_classes), (3, 32, 32)),
    "vit-cifar": (cifar_vit, (3, 32, 32)),
    "resnet18": (_torchvision("resnet18"), (3, 224, 224)),
    "resnet50": (_torchvision("resnet50"), (3, 224, 224)),
    "vgg11_bn": (_torchvision("vgg11_bn"), (3, 224, 224)),
    "mobilenet_v2": (_torchvision("mobilenet_v2"), (3, 224, 224)),
}


def build_model(name: str, num_classes: int | None = None) -> nn.Module:
    """A randomly initialized member of architecture ``name`` (see ``MODELS``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    constructor, _ = MODELS[name]
    return constructor() if num_classes is None else constructor(num_classes=num_classes)


def input_shape(name: str) -> tuple[int, ...]:
    """The shape of one input sample of architecture ``name``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    return MODELS[name][1]
