"""`svhn`: the Street View House Numbers, cropped-digits format (Netzer et al. 2011): 73,257
training and 26,032 test images, 32x32 RGB, 10 classes.

Reads the official MATLAB files with torchvision's reader (`torchvision.datasets.SVHN`,
`download=False`), which needs scipy and checks each file's MD5 against the official one:

    <root>/train_32x32.mat   <root>/test_32x32.mat

(`<root>/svhn/` is tried too.) The root is the `root` option, else $BENCH_SVHN_ROOT, else
./data. torchvision relabels the digit 0 from the files' 10 to 0. The 531,131 "extra" training
images (`extra_32x32.mat`) are not used, as in the usual backdoor benchmarks. Training never
mirrors images: a mirrored house number is not the same digit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

import bench
from bench import DatasetSplits
from bench import DataNotFoundError
from bench_plugins.datasets._torchvision_files import make_splits, not_found, require_module, root_candidates

SPLIT_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
DOWNLOAD_HINT = (
    "Get train_32x32.mat and test_32x32.mat from http://ufldl.stanford.edu/housenumbers/ (the "
    "'Format 2: cropped digits' files) into the root, or run torchvision.datasets.SVHN(root, "
    "split=..., download=True) once on a machine with network access."
)


class Svhn(bench.Dataset):
    name = "svhn"
    description = "SVHN cropped house-number digits, 32x32 RGB, 10 classes (official .mat files)"
    horizontal_flip = False  # a mirrored digit is not the same digit

    @dataclass(frozen=True)
    class Options:
        root: str = bench.option(
            "", "folder holding train_32x32.mat and test_32x32.mat (default: $BENCH_SVHN_ROOT, else ./data)", path=True
        )
        train_images: int = bench.option(0, "use only this many training images (seeded subset; 0: all)", min=0)
        test_images: int = bench.option(0, "use only this many test images (seeded subset; 0: all)", min=0)

    def load(self) -> DatasetSplits:
        looked = []
        for root, origin in root_candidates(self.name, self.options.root):
            for folder in (root, root / "svhn"):
                if all((folder / f).is_file() for f in SPLIT_FILES.values()):
                    require_module("scipy", self.name, "the SVHN .mat files")
                    return make_splits(
                        _read(folder),
                        10,
                        f"SVHN official files (torchvision reader, {folder})",
                        dataset=self.name,
                        train_images=self.options.train_images,
                        test_images=self.options.test_images,
                    )
            missing = [f for f in SPLIT_FILES.values() if not (root / f).is_file()]
            looked.append(f"{root}/ and {root / 'svhn'}/ from {origin}, missing {', '.join(missing)} in {root}/")
        raise not_found(self.name, looked, DOWNLOAD_HINT)


def _read(folder: Path) -> dict[str, np.ndarray]:
    from torchvision.datasets import SVHN

    arrays = {}
    for split, filename in SPLIT_FILES.items():
        try:
            ds = SVHN(str(folder), split=split, download=False)
        except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
            raise DataNotFoundError(
                f"svhn: {folder / filename} is there but its MD5 checksum is not the official file's "
                f"(torchvision says: {exc}); the file is truncated or not the original. {DOWNLOAD_HINT}"
            ) from exc
        arrays[f"x_{split}"] = np.ascontiguousarray(ds.data)  # already [N, 3, 32, 32] uint8
        arrays[f"y_{split}"] = ds.labels.astype(np.int64)
    return arrays


@bench.hookimpl
def register_datasets(register):
    register(Svhn)
