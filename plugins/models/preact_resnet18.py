"""`preact_resnet18`: PreAct-ResNet-18 (He et al. 2016, identity mappings) for 32x32 inputs,
the backbone of the MCR and BackdoorBench CIFAR-10 results."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

import bench


class PreActBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int, blocks=(2, 2, 2, 2)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        layers, c_in = [], width
        for i, count in enumerate(blocks):
            c_out = width * 2**i
            for j in range(count):
                layers.append(PreActBlock(c_in, c_out, stride=2 if (i > 0 and j == 0) else 1))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(c_in)
        self.linear = nn.Linear(c_in, num_classes)

    def forward(self, x):
        out = self.layers(self.conv1(x))
        out = F.relu(self.bn(out)).mean(dim=(2, 3))  # global pooling; deterministic on CUDA
        return self.linear(out)


class PreActResNet18(bench.Model):
    name = "preact_resnet18"
    description = "PreAct-ResNet-18 for 32x32 inputs (the MCR / BackdoorBench CIFAR-10 backbone)"
    recipe = bench.TrainRecipe(
        epochs=30, batch_size=512, lr=0.2, weight_decay=5e-4, warmup_fraction=0.15, augment=True, crop_padding=4
    )

    @dataclass(frozen=True)
    class Options:
        width: int = bench.option(64, "channels of the first stage (64 in the published network)", min=1)

    def build(self, shape: bench.InputShape) -> nn.Module:
        return PreActResNet(shape.channels, shape.num_classes, self.options.width)


@bench.hookimpl
def register_models(register):
    register(PreActResNet18)
