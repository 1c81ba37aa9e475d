"""The model (architecture) plugin kind, its training recipe, and the wrapper that makes every
network take images in [0, 1] with the dataset's normalization inside."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bench.options import option
from bench.plugin import Plugin


@dataclass(frozen=True)
class InputShape:
    channels: int
    height: int
    width: int
    num_classes: int


@dataclass(frozen=True)
class TrainRecipe:
    """How a model family is trained. Each model plugin sets its defaults; a suite's
    `[training]` table overrides single fields."""

    epochs: int = option(10, "passes over the training set", min=1)
    batch_size: int = option(128, "images per optimizer step", min=1)
    lr: float = option(0.05, "peak learning rate (SGD, Nesterov momentum)", min=0, min_exclusive=True)
    momentum: float = option(0.9, "SGD momentum", min=0, max=1)
    weight_decay: float = option(5e-4, "L2 weight decay", min=0)
    warmup_fraction: float = option(
        0.15, "share of steps with linearly rising lr; then linear decay to 0", min=0, max=1
    )
    label_smoothing: float = option(0.0, "cross-entropy label smoothing", min=0, max=1)
    augment: bool = option(True, "random crop (and flip where the dataset allows) on the device")
    crop_padding: int = option(4, "pixels of zero padding for the random crop", min=0)


class Model(Plugin):
    """A model plugin: `build(shape)` returns an `nn.Module` mapping normalized float images to
    logits. `recipe` holds the family's training defaults."""

    kind: ClassVar[str] = "model"
    recipe: ClassVar[TrainRecipe] = TrainRecipe()

    def build(self, shape: InputShape) -> nn.Module:
        raise NotImplementedError


class GridAvgPool(nn.Module):
    """The mean over each cell of a `grid` x `grid` partition of the feature map: what
    `nn.AdaptiveAvgPool2d(grid)` computes when the sides divide by `grid` (a remainder row or
    column is dropped otherwise), but with a deterministic CUDA backward, which adaptive pooling
    lacks. Free of shape-dependent branches, so torch.fx can trace it (SAP does)."""

    def __init__(self, grid: int = 1):
        super().__init__()
        self.grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, (x.shape[2] // self.grid, x.shape[3] // self.grid))


class Classifier(nn.Module):
    """A network behind a fixed normalization: takes float images in [0, 1], returns logits.
    Every attack and defense sees models in this form."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    mean: torch.Tensor
    std: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)
