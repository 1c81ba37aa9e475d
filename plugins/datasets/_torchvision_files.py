"""What the dataset plugins that read official files with torchvision's readers share: where
the root is, the error when the files are not there, the .npz cache of decoded arrays, seeded
subsets and the assembly of `DatasetSplits`. Not a plugin: it registers nothing.

The root of a dataset `NAME` is its `root` option, else $BENCH_<NAME>_ROOT, else ./data. The
readers are always called with `download=False`: a benchmark run never fetches data.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bench.toolkit import cache_dir, channel_stats, save_arrays_atomically
from bench import DatasetSplits, ImageData
from bench import BenchError, DataNotFoundError

ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")


def root_candidates(dataset: str, root_option: str, layout: tuple[str, ...] = ()) -> list[tuple[Path, str]]:
    """The roots to try, each with where it came from, best first.

    The configured root comes first. When that path itself ends in (a prefix of) the folder
    layout torchvision expects below the root, e.g. `.../MNIST/raw` for `MNIST/raw`, the folder
    above that layout is tried next, so pointing at the data folder itself works too."""
    env_name = f"BENCH_{dataset.upper()}_ROOT"
    if root_option:
        root, origin = Path(root_option).expanduser(), "the root option"
    elif os.environ.get(env_name):
        root, origin = Path(os.environ[env_name]).expanduser(), f"${env_name}"
    else:
        root, origin = Path("data").absolute(), f"the default ./data (no root option, ${env_name} unset)"
    candidates = [(root, origin)]
    for depth in range(len(layout), 0, -1):
        if tuple(root.parts[-depth:]) == layout[:depth] and len(root.parts) > depth:
            candidates.append((root.parents[depth - 1], f"{origin}, above its {'/'.join(layout[:depth])}"))
            break
    return candidates


def not_found(dataset: str, looked: list[str], how_to_get: str) -> DataNotFoundError:
    """The error for absent files: every path looked at, and how to provide the files."""
    places = "; ".join(looked)
    return DataNotFoundError(
        f"{dataset}: the official files were not found (looked for: {places}). {how_to_get} Then give the "
        f'folder as [[datasets]] root = "..." in the suite or in $BENCH_{dataset.upper()}_ROOT '
        "(default ./data). Nothing is downloaded at run time."
    )


def require_module(module: str, dataset: str, why: str) -> None:
    """Raise a `BenchError` naming the package to install if a reader dependency is missing."""
    if importlib.util.find_spec(module) is None:
        raise BenchError(
            f"{dataset}: reading {why} needs the Python package '{module}', which is not "
            f"installed; install it (pip install {module}) and run again"
        )


def cached_arrays(dataset: str, fingerprint: str, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Arrays decoded once by `build` and then read from `<cache_dir>/<dataset>-<hash>.npz`.
    `fingerprint` must change whenever the decoded result would (root path, file count, size)."""
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    cached = cache_dir() / f"{dataset}-{digest}.npz"
    if cached.is_file():
        with np.load(cached) as arrays:
            return {key: arrays[key] for key in arrays.files}
    arrays = build()
    save_arrays_atomically(cached, arrays)
    return arrays


def seeded_subset(data: ImageData, count: int, stream: str) -> ImageData:
    """`count` images drawn with a fixed seed (the same for every job), in their original order;
    all of them when `count` is 0 or not smaller than the set."""
    if count == 0 or count >= len(data):
        return data
    seed = int(hashlib.sha256(stream.encode()).hexdigest()[:15], 16)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data.subset(order[:count].sort().values)


def make_splits(
    arrays: dict[str, np.ndarray],
    num_classes: int,
    source: str,
    *,
    dataset: str,
    train_images: int = 0,
    test_images: int = 0,
) -> DatasetSplits:
    """`DatasetSplits` from uint8 NCHW image arrays and integer labels; mean and std of the
    (possibly subsetted) training images."""
    x_train, y_train, x_test, y_test = (torch.from_numpy(np.ascontiguousarray(arrays[k])) for k in ARRAY_KEYS)
    train = seeded_subset(ImageData(x_train, y_train.long()), train_images, f"{dataset}:train")
    test = seeded_subset(ImageData(x_test, y_test.long()), test_images, f"{dataset}:test")
    for split, data in (("train", train), ("test", test)):
        if len(data) and (data.y.min() < 0 or data.y.max() >= num_classes):
            raise DataNotFoundError(
                f"{dataset}: {split} labels span {int(data.y.min())}..{int(data.y.max())}, "
                f"expected 0..{num_classes - 1}; the files are not the official ones"
            )
    mean, std = channel_stats(train.x)
    return DatasetSplits(train, test, num_classes=num_classes, mean=mean, std=std, source=source)
