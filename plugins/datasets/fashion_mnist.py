"""`fashion_mnist`: Fashion-MNIST (Xiao et al. 2017), Zalando's drop-in replacement for MNIST:
60,000 training and 10,000 test images of clothing, 28x28 grey-scale, 10 classes.

Reads the four official IDX files (same names as MNIST's) with torchvision's reader
(`torchvision.datasets.FashionMNIST`, `download=False`) from `<root>/FashionMNIST/raw/`. The
root is the `root` option, else $BENCH_FASHION_MNIST_ROOT, else ./data. The loading logic is
MNIST's (`bench_plugins.datasets.mnist`); only the reader, the folder and the hints differ.

Images are not mirrored in training, like the other digit-like sets: many garments are
left-right symmetric, but the product photos are taken in a fixed pose (footwear faces one way),
so a mirrored image is one the test set does not show, and no flip keeps the set comparable
with MNIST runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import bench
from bench_plugins.datasets.mnist import Mnist


class FashionMnist(Mnist):
    name = "fashion_mnist"
    description = "Fashion-MNIST clothing images, 28x28 grey-scale, 10 classes (official IDX files)"
    horizontal_flip = False  # shoes face one way throughout the data set

    reader_name = "FashionMNIST"
    title = "Fashion-MNIST"
    download_hint = (
        "Get train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
        "t10k-labels-idx1-ubyte.gz from https://github.com/zalandoresearch/fashion-mnist (data/fashion/), "
        "gunzip them into <root>/FashionMNIST/raw/, or run torchvision.datasets.FashionMNIST(root, "
        "download=True) once on a machine with network access."
    )

    @dataclass(frozen=True)
    class Options:
        root: str = bench.option(
            "", "folder holding FashionMNIST/raw/ (default: $BENCH_FASHION_MNIST_ROOT, else ./data)", path=True
        )
        train_images: int = bench.option(0, "use only this many training images (seeded subset; 0: all)", min=0)
        test_images: int = bench.option(0, "use only this many test images (seeded subset; 0: all)", min=0)


@bench.hookimpl
def register_datasets(register):
    register(FashionMnist)
