"""`mnist`: MNIST handwritten digits (LeCun et al. 1998), 60,000 training and 10,000 test
images, 28x28 grey-scale, 10 classes.

Reads the four official IDX files with torchvision's reader (`torchvision.datasets.MNIST`,
`download=False`) from `<root>/MNIST/raw/`, the layout torchvision itself downloads to:

    <root>/MNIST/raw/train-images-idx3-ubyte   train-labels-idx1-ubyte
    <root>/MNIST/raw/t10k-images-idx3-ubyte    t10k-labels-idx1-ubyte

The root is the `root` option, else $BENCH_MNIST_ROOT, else ./data; pointing the root at the
`MNIST/` or `MNIST/raw/` folder itself works too. Images stay 28x28 with one channel (the models
adapt to the input shape) and are never mirrored in training: a mirrored digit is not the same
digit. `fashion_mnist` reuses this loader with another reader and folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

import bench
from bench import DatasetSplits
from bench_plugins.datasets._torchvision_files import make_splits, not_found, root_candidates

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class Mnist(bench.Dataset):
    name = "mnist"
    description = "MNIST handwritten digits, 28x28 grey-scale, 10 classes (official IDX files)"
    horizontal_flip = False  # a mirrored digit is not the same digit

    # What differs between MNIST and its drop-in replacements (Fashion-MNIST).
    reader_name: ClassVar[str] = "MNIST"  # the torchvision.datasets class, and its folder under the root
    title: ClassVar[str] = "MNIST"
    download_hint: ClassVar[str] = (
        "Get the four files from https://yann.lecun.com/exdb/mnist/ (or a mirror such as "
        "https://ossci-datasets.s3.amazonaws.com/mnist/), gunzip them into <root>/MNIST/raw/, or run "
        "torchvision.datasets.MNIST(root, download=True) once on a machine with network access."
    )

    @dataclass(frozen=True)
    class Options:
        root: str = bench.option("", "folder holding MNIST/raw/ (default: $BENCH_MNIST_ROOT, else ./data)", path=True)
        train_images: int = bench.option(0, "use only this many training images (seeded subset; 0: all)", min=0)
        test_images: int = bench.option(0, "use only this many test images (seeded subset; 0: all)", min=0)

    def load(self) -> DatasetSplits:
        looked = []
        for root, origin in root_candidates(self.name, self.options.root, (self.reader_name, "raw")):
            raw = root / self.reader_name / "raw"
            missing = [f for f in IDX_FILES if not (raw / f).is_file()]
            if not missing:
                arrays = self._read(root)
                return make_splits(
                    arrays,
                    10,
                    f"{self.title} official files (torchvision reader, {raw})",
                    dataset=self.name,
                    train_images=self.options.train_images,
                    test_images=self.options.test_images,
                )
            looked.append(f"{raw}/ from {origin}, missing {', '.join(missing)}{_gzip_hint(raw, missing)}")
        raise not_found(self.name, looked, self.download_hint)

    def _read(self, root: Path) -> dict[str, np.ndarray]:
        import torchvision.datasets

        reader = getattr(torchvision.datasets, self.reader_name)
        arrays = {}
        for split, train in (("train", True), ("test", False)):
            ds = reader(str(root), train=train, download=False)
            arrays[f"x_{split}"] = ds.data.numpy()[:, None, :, :]  # grey-scale stays one channel
            arrays[f"y_{split}"] = ds.targets.numpy().astype(np.int64)
        return arrays


def _gzip_hint(raw: Path, missing: list[str]) -> str:
    """A hint when the downloaded .gz archives are there but were never unpacked."""
    packed = [f for f in missing if (raw / f"{f}.gz").is_file()]
    return f" (found {len(packed)} of them still gzipped: gunzip them)" if packed else ""


@bench.hookimpl
def register_datasets(register):
    register(Mnist)
