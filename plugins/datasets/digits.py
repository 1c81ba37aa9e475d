"""`digits`: scikit-learn's bundled 8x8 grey-scale handwritten digits (1,797 images, 10
classes). It ships with the install, so it is the embedded default for the quickstart and tests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import bench
from bench.toolkit import channel_stats
from bench import DatasetSplits, ImageData


class Digits(bench.Dataset):
    name = "digits"
    description = "scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes)"
    horizontal_flip = False  # a mirrored digit is not the same digit

    @dataclass(frozen=True)
    class Options:
        test_fraction: float = bench.option(0.3, "share of images held out as the test set", min=0.05, max=0.9)
        split_seed: int = bench.option(0, "seed of the fixed train/test split (the same for every job seed)", min=0)

    def load(self) -> DatasetSplits:
        from sklearn.datasets import load_digits

        digits = load_digits()
        # Pixel values are 0..16; scale to the uint8 range every other dataset uses.
        images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
        labels = digits.target.astype(np.int64)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.options.split_seed))
        test_count = int(round(self.options.test_fraction * len(labels)))
        x, y = torch.from_numpy(images)[order], torch.from_numpy(labels)[order]
        train = ImageData(x[test_count:].contiguous(), y[test_count:].contiguous())
        test = ImageData(x[:test_count].contiguous(), y[:test_count].contiguous())
        mean, std = channel_stats(train.x)
        return DatasetSplits(
            train, test, num_classes=10, mean=mean, std=std, source="scikit-learn load_digits (8x8, 1,797 images)"
        )


@bench.hookimpl
def register_datasets(register):
    register(Digits)
