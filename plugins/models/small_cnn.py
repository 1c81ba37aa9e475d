"""`small_cnn`: a three-convolution network for small inputs (8x8 digits up to 32x32), quick
enough to train on a CPU in seconds."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

import bench
from bench.toolkit import GridAvgPool


class SmallCNN(bench.Model):
    name = "small_cnn"
    description = "Three conv-BN-ReLU blocks and a linear head; trains on a CPU in seconds"
    recipe = bench.TrainRecipe(
        epochs=15, batch_size=64, lr=0.05, weight_decay=5e-4, warmup_fraction=0.1, augment=False, crop_padding=1
    )

    @dataclass(frozen=True)
    class Options:
        width: int = bench.option(32, "channels of the first convolution (doubled in each later one)", min=1)

    def build(self, shape: bench.InputShape) -> nn.Module:
        w = self.options.width

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        return nn.Sequential(
            *block(shape.channels, w),
            *block(w, 2 * w),
            nn.MaxPool2d(2),
            *block(2 * w, 4 * w),
            GridAvgPool(2),
            nn.Flatten(),
            nn.Linear(4 * w * 4, shape.num_classes),
        )


@bench.hookimpl
def register_models(register):
    register(SmallCNN)
