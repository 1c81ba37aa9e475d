"""`vgg16_bn`: VGG-16 (Simonyan & Zisserman 2015, configuration D) with batch normalization
after every convolution, in the CIFAR form, about 14.7 million parameters.

The 13 3x3 convolutions (64, 64, M, 128, 128, M, 256 x3, M, 512 x3, M, 512 x3, M) are the
ImageNet network's; the head is the usual CIFAR one (as in the widely used pytorch-cifar
reference, kuangliu/pytorch-cifar): the five poolings take 32x32 to 1x1 and a single linear
layer maps the 512 features to the classes, in place of ImageNet's three 4096-wide layers.
Pooling rounds up (`ceil_mode`) and global average pooling precedes the head, so inputs that
are not a multiple of 32 (28x28 MNIST) work too; at 32x32 both change nothing.

Training recipe: a fast schedule chosen for this benchmark, the one `preact_resnet18` uses:
30 epochs of batch 512, linear warm-up to lr 0.2 over 15% of the steps, then linear decay,
Nesterov momentum 0.9, weight decay 5e-4 (batch normalization after every convolution is what
makes so large a step safe without residual connections). The schedule was not tuned for this
network; override any field in a suite's `[training]` table.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

import bench
from bench.toolkit import GridAvgPool

# Channels of each convolution as multiples of `width` (64 in the published network); "M" is a
# 2x2 max-pooling.
VGG16_LAYOUT = (1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M")


class Vgg(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int, layout=VGG16_LAYOUT):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for item in layout:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                c_out = width * item
                layers += [
                    nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                    nn.BatchNorm2d(c_out),
                    nn.ReLU(inplace=True),
                ]
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = GridAvgPool(1)  # global pooling; deterministic on CUDA
        self.classifier = nn.Linear(c_in, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


class Vgg16Bn(bench.Model):
    name = "vgg16_bn"
    description = "VGG-16 with batch normalization, CIFAR form (one linear layer head), 14.7M parameters"
    recipe = bench.TrainRecipe(
        epochs=30,
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
            64, "channels of the first convolutions (64 in the published network; later ones are 2x, 4x and 8x)", min=1
        )

    def build(self, shape: bench.InputShape) -> nn.Module:
        return Vgg(shape.channels, shape.num_classes, self.options.width)


@bench.hookimpl
def register_models(register):
    register(Vgg16Bn)
