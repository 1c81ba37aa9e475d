"""`resnet20`: ResNet-20 for CIFAR (He et al. 2016, "Deep Residual Learning", section 4.2),
about 0.27 million parameters: a 3x3 convolution, three stages of three basic blocks with
`width`, 2x`width` and 4x`width` channels (16/32/64 in the paper), global average pooling and a
linear layer.

As in the paper, shortcuts that halve the resolution and double the channels are parameter-free
("option A"): the input is subsampled by 2 and padded with zero channels. That is what keeps
the network at 0.27M parameters; a 1x1-convolution shortcut ("option B") would add some. Global
average pooling makes the network accept any input size (28x28 MNIST, 32x32 CIFAR).

Training recipe: the paper trains 164 epochs (64k steps of batch 128, lr 0.1 divided by 10 at
32k and 48k, weight decay 1e-4). The defaults here are a fast schedule instead, the one the
other CIFAR models of this benchmark use: 40 epochs of batch 512 with linear warm-up to lr 0.2
and linear decay, Nesterov momentum 0.9, weight decay 5e-4 (the higher decay suits the short
schedule). This schedule was chosen for speed, not tuned or measured against the paper's
91.25% CIFAR-10 accuracy. Override any field in a suite's `[training]` table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import bench


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut; at a stage change the shortcut
    subsamples and zero-pads channels (option A), adding no parameters."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride = stride
        self.extra_channels = c_out - c_in

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra_channels:
            half = self.extra_channels // 2
            x = F.pad(x, (0, 0, 0, 0, half, self.extra_channels - half))
        return x

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet family (6n+2 layers): n blocks per stage; ResNet-20 is n = 3."""

    def __init__(self, in_channels: int, num_classes: int, width: int, blocks_per_stage: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, c_in = [], width
        for stage in range(3):
            c_out = width * 2**stage
            for block in range(blocks_per_stage):
                layers.append(BasicBlock(c_in, c_out, stride=2 if (stage > 0 and block == 0) else 1))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(c_in, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):  # He initialization, as in the paper
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.linear(out.mean(dim=(2, 3)))  # global pooling; deterministic on CUDA


class ResNet20(bench.Model):
    name = "resnet20"
    description = "ResNet-20 for CIFAR (He et al. 2016), 0.27M parameters, parameter-free shortcuts"
    recipe = bench.TrainRecipe(
        epochs=40,
        batch_size=512,
        lr=0.2,
        momentum=0.9,
        weight_decay=5e-4,
        warmup_fraction=0.15,
        augment=True,
        crop_padding=4,
    )

    @dataclass(frozen=True)
    class Options:
        width: int = bench.option(
            16, "channels of the first stage (16 in the paper; doubled in each later stage)", min=2
        )

    def build(self, shape: bench.InputShape) -> nn.Module:
        return CifarResNet(shape.channels, shape.num_classes, self.options.width)


@bench.hookimpl
def register_models(register):
    register(ResNet20)
