"""Image data as the core passes it around: uint8 tensors in NCHW layout, plus the dataset
plugin kind. Where dataset plugins cache decoded files is `bench.artifact_cache` (exported by
`bench.toolkit`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.plugin import Plugin


@dataclass(frozen=True)
class ImageData:
    """Images as uint8 [N, C, H, W] and integer labels [N], on any device."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self):
        if self.x.dtype != torch.uint8 or self.x.dim() != 4:
            raise ValueError(f"ImageData.x must be uint8 [N, C, H, W], got {self.x.dtype} {tuple(self.x.shape)}")
        if len(self.x) != len(self.y):
            raise ValueError(f"ImageData has {len(self.x)} images but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, indices: torch.Tensor) -> "ImageData":
        indices = indices.to(self.x.device)
        return ImageData(self.x[indices], self.y[indices])

    def to(self, device: torch.device | str) -> "ImageData":
        return ImageData(self.x.to(device), self.y.to(device))


@dataclass(frozen=True)
class DatasetSplits:
    """What a dataset plugin's `load` returns."""

    train: ImageData
    test: ImageData
    num_classes: int
    mean: tuple[float, ...]  # per channel, of pixel values in [0, 1]
    std: tuple[float, ...]
    source: str  # where the images came from, recorded with every result
    fingerprint: str = ""  # a hash of the pixels and labels, set by the core (cache keys)


class Dataset(Plugin):
    """A dataset plugin: `load()` returns `DatasetSplits` with uint8 images on the CPU.

    `horizontal_flip` says whether mirrored images are still valid examples of their class
    (true for CIFAR-10, false for digits); training augmentation respects it.
    """

    kind: ClassVar[str] = "dataset"
    horizontal_flip: ClassVar[bool] = True

    def load(self) -> DatasetSplits:
        raise NotImplementedError


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units."""
    xf = x.float().div_(255)
    mean = xf.mean(dim=(0, 2, 3))
    std = xf.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())
