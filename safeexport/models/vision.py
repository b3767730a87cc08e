"""Image models: a small CNN and the CIFAR variants of AlexNet, VGG16 (BN) and ResNet18, plus
Nasr et al.'s tabular MLP. All take float inputs in [0, 1]; normalisation and resizing happen in
the model's own ``InputAdapter`` so an exported file takes exactly what the dataset gives."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def scaled(channels: int, width: float) -> int:
    """``channels`` times the width multiplier, at least 1 (a narrower copy of the model)."""
    return max(1, round(channels * width))


class InputAdapter(nn.Module):
    """Normalise per channel, then resize to the architecture's input size if it differs.

    Lets every image model take images of any size and channel count (the first conv is built
    for the data's channels; bilinear resizing covers the size).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float],
                 input_size: Sequence[int], native_size: Sequence[int] | None) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.resize = (tuple(native_size) if native_size is not None
                       and tuple(native_size) != tuple(input_size) else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        if self.resize is not None:
            x = F.interpolate(x, size=self.resize, mode="bilinear", align_corners=False)
        return x


class SmallCNN(nn.Module):
    """Three 3×3 conv blocks with batch norm, global average pooling, two linear layers
    (~110k weights at width 1); any input size from 4×4 up. ``width`` scales every layer's
    channels (the distilled students of the kd baselines are narrower copies)."""

    def __init__(self, in_channels: int, num_classes: int, input_size: Sequence[int],
                 mean: Sequence[float], std: Sequence[float], width: float = 1.0) -> None:
        super().__init__()
        self.adapter = InputAdapter(mean, std, input_size, None)
        c1, c2, c3 = (scaled(c, width) for c in (32, 64, 128))
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1), nn.BatchNorm2d(c3), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Sequential(nn.Linear(c3, c3), nn.ReLU(),
                                        nn.Linear(c3, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.adapter(x)))


class AlexNetCifar(nn.Module):
    """AlexNet for 32×32 inputs (the variant used in MIA papers on CIFAR); ``width`` scales
    the channels."""

    def __init__(self, in_channels: int, num_classes: int, input_size: Sequence[int],
                 mean: Sequence[float], std: Sequence[float], width: float = 1.0) -> None:
        super().__init__()
        self.adapter = InputAdapter(mean, std, input_size, (32, 32))
        c1, c2, c3, c4 = (scaled(c, width) for c in (64, 192, 384, 256))
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 11, stride=4, padding=5), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c3, c4, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c4, c4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(c4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.adapter(x)))


VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
             512, 512, 512, "M")


class VGG16Cifar(nn.Module):
    """VGG16 with batch norm for 32×32 inputs: 13 conv layers, one linear classifier;
    ``width`` scales the channels."""

    def __init__(self, in_channels: int, num_classes: int, input_size: Sequence[int],
                 mean: Sequence[float], std: Sequence[float], width: float = 1.0) -> None:
        super().__init__()
        self.adapter = InputAdapter(mean, std, input_size, (32, 32))
        layers: list[nn.Module] = []
        c = in_channels
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                v = scaled(v, width)
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.adapter(x)))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 convs with BN and an identity or 1×1 shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18Cifar(nn.Module):
    """ResNet18 with the CIFAR stem (3×3 conv, no max-pool); global pooling takes any size;
    ``width`` scales the channels."""

    def __init__(self, in_channels: int, num_classes: int, input_size: Sequence[int],
                 mean: Sequence[float], std: Sequence[float], width: float = 1.0) -> None:
        super().__init__()
        self.adapter = InputAdapter(mean, std, input_size, None)
        c = scaled(64, width)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(c), nn.ReLU())
        blocks = []
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            cout = scaled(cout, width)
            blocks += [BasicBlock(c, cout, stride), BasicBlock(cout, cout, 1)]
            c = cout
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.layers(self.stem(self.adapter(x)))))


class MLP(nn.Module):
    """Nasr et al.'s Purchase/Texas MLP: in → 1024 → 512 → 256 → 128 → C with tanh.

    Image inputs are flattened, so it also runs on any image dataset. ``width`` scales the
    hidden layers.
    """

    def __init__(self, in_features: int, num_classes: int,
                 hidden: Sequence[int] = (1024, 512, 256, 128), width: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        d = in_features
        for h in (scaled(h, width) for h in hidden):
            layers += [nn.Linear(d, h), nn.Tanh()]
            d = h
        layers.append(nn.Linear(d, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
