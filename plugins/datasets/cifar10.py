"""`cifar10`: CIFAR-10 (Krizhevsky 2009), 50,000 training and 10,000 test images, 32x32 RGB.

Reads, in this order of preference, whatever it finds under the root:
1. torchvision's official files (`cifar-10-batches-py/`), the reference pixels;
2. an ImageFolder layout (`train/<class>/*.jpg`, `test/<class>/*.jpg`, optionally inside
   `cifar10/`), e.g. the JPEG copy in the project's shared data;
3. the tarball `cifar10-jpeg.tar.gz` (or the root is that file), extracted once into the cache.

The root is the `root` option, else $BENCH_CIFAR10_ROOT, else ./data. JPEGs are decoded once and
the uint8 arrays cached as .npz in the cache directory ($BENCH_CACHE_DIR).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import bench
from bench.toolkit import cache_dir, channel_stats, record_written, save_arrays_atomically
from bench import DatasetSplits, ImageData
from bench import DataNotFoundError

TARBALL = "cifar10-jpeg.tar.gz"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class Cifar10(bench.Dataset):
    name = "cifar10"
    description = "CIFAR-10, 32x32 RGB, 10 classes (torchvision files, an ImageFolder or the JPEG tarball)"
    horizontal_flip = True

    @dataclass(frozen=True)
    class Options:
        root: str = bench.option("", "where the data is (default: $BENCH_CIFAR10_ROOT, else ./data)", path=True)
        train_images: int = bench.option(0, "use only this many training images (seeded subset; 0: all)", min=0)
        test_images: int = bench.option(0, "use only this many test images (seeded subset; 0: all)", min=0)

    def load(self) -> DatasetSplits:
        candidates = self._candidate_roots()
        for root in candidates:
            found = _load_from(root)
            if found is not None:
                (x_train, y_train, x_test, y_test), source = found
                break
        else:
            looked = ", ".join(str(c) for c in candidates)
            raise DataNotFoundError(
                f"cifar10: no CIFAR-10 data found (looked in: {looked}). Give the folder holding "
                f"'cifar-10-batches-py/' (torchvision's files), an ImageFolder 'train/' and 'test/', or "
                f"'{TARBALL}', as [[datasets]] root = \"...\" in the suite or in $BENCH_CIFAR10_ROOT. "
                "Nothing is downloaded at run time."
            )
        train = _subset(ImageData(x_train, y_train), self.options.train_images, "train")
        test = _subset(ImageData(x_test, y_test), self.options.test_images, "test")
        mean, std = channel_stats(train.x)
        return DatasetSplits(train, test, num_classes=10, mean=mean, std=std, source=source)

    def _candidate_roots(self) -> list[Path]:
        if self.options.root:
            return [Path(self.options.root).expanduser()]
        env = os.environ.get("BENCH_CIFAR10_ROOT")
        return [Path(env).expanduser()] if env else [Path("data")]


def _subset(data: ImageData, count: int, stream: str) -> ImageData:
    if count == 0 or count >= len(data):
        return data
    order = torch.randperm(
        len(data), generator=torch.Generator().manual_seed(int.from_bytes(stream.encode(), "little"))
    )
    return data.subset(order[:count].sort().values)


def _load_from(root: Path):
    """((x_train, y_train, x_test, y_test), source description) or None if root holds no data."""
    if root.is_file() and root.name.endswith(".tar.gz"):
        return _load_image_folder(_extract(root), f"CIFAR-10 JPEG copy ({root.name})")
    if not root.is_dir():
        return None
    batches = root if (root / "data_batch_1").is_file() else root / "cifar-10-batches-py"
    if (batches / "data_batch_1").is_file():
        return _load_torchvision(batches.parent), "CIFAR-10 official files (torchvision reader)"
    for folder in (root, root / "cifar10"):
        if (folder / "train").is_dir() and (folder / "test").is_dir():
            return _load_image_folder(folder, f"CIFAR-10 ImageFolder ({folder})")
    if (root / TARBALL).is_file():
        return _load_image_folder(_extract(root / TARBALL), f"CIFAR-10 JPEG copy ({TARBALL})")
    return None


def _load_torchvision(root: Path):
    from torchvision.datasets import CIFAR10

    out = []
    for train in (True, False):
        ds = CIFAR10(str(root), train=train, download=False)
        out += [torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets, dtype=torch.long)]
    return tuple(out)


def _extract(tarball: Path) -> Path:
    """Extract the tarball once into the cache; returns the folder holding train/ and test/."""
    digest = hashlib.sha256(f"{tarball.resolve()}:{tarball.stat().st_size}".encode()).hexdigest()[:16]
    target = cache_dir() / f"cifar10-jpeg-{digest}"
    if not target.is_dir():
        # Extracted beside the target under a unique name, then renamed into place: a reader never
        # sees half the images, and of two processes extracting at once one rename wins.
        partial = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{target.name}.", suffix=".tmp"))
        try:
            with tarfile.open(tarball) as archive:
                archive.extractall(partial, filter="data")
            try:
                partial.rename(target)
            except OSError:
                if not target.is_dir():
                    raise
            record_written(target)  # so that `bench cache clear --datasets` may remove it
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    for folder in (target, target / "cifar10"):
        if (folder / "train").is_dir():
            return folder
    raise DataNotFoundError(f"cifar10: {tarball} holds no train/ folder (extracted to {target})")


def _load_image_folder(folder: Path, source: str):
    """Decode an ImageFolder once; later loads read the cached uint8 arrays."""
    files = {
        split: sorted(p for p in (folder / split).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        for split in ("train", "test")
    }
    fingerprint = f"{folder.resolve()}:{len(files['train'])}:{len(files['test'])}"
    cached = cache_dir() / f"cifar10-{hashlib.sha256(fingerprint.encode()).hexdigest()[:16]}.npz"
    if cached.is_file():
        arrays = np.load(cached)
        return tuple(torch.from_numpy(arrays[k]) for k in ("x_train", "y_train", "x_test", "y_test")), source
    classes = sorted(p.name for p in (folder / "train").iterdir() if p.is_dir())
    if len(classes) != 10:
        raise DataNotFoundError(f"cifar10: {folder / 'train'} has {len(classes)} class folders, expected 10")
    arrays = {}
    for split in ("train", "test"):
        labels = np.array([classes.index(p.parent.name) for p in files[split]], dtype=np.int64)
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            images = np.stack(list(pool.map(_decode, files[split])))
        arrays[f"x_{split}"] = images.transpose(0, 3, 1, 2).copy()
        arrays[f"y_{split}"] = labels
    save_arrays_atomically(cached, arrays)
    return tuple(torch.from_numpy(arrays[k]) for k in ("x_train", "y_train", "x_test", "y_test")), source


def _decode(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


@bench.hookimpl
def register_datasets(register):
    register(Cifar10)
