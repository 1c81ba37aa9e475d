"""`gtsrb`: the German Traffic Sign Recognition Benchmark (Stallkamp et al. 2012): 39,209
training and 12,630 test images of 43 sign classes, RGB, from 15x15 to 250x250 pixels.

Reads the official files with torchvision's reader (`torchvision.datasets.GTSRB`,
`download=False`) in the layout torchvision downloads to, i.e. the three official zip files
(GTSRB-Training_fixed.zip, GTSRB_Final_Test_Images.zip, GTSRB_Final_Test_GT.zip) unpacked into
`<root>/gtsrb/`:

    <root>/gtsrb/GTSRB/Training/00000/*.ppm ... 00042/*.ppm
    <root>/gtsrb/GTSRB/Final_Test/Images/*.ppm
    <root>/gtsrb/GT-final_test.csv

The root is the `root` option, else $BENCH_GTSRB_ROOT, else ./data; pointing it at the `gtsrb/`
folder itself works too. Every image is resized, whole (not cropped to the sign's bounding box
listed in the CSV files), to `image_size` x `image_size` with Pillow's antialiased bilinear
filter.
Decoding some 50,000 small PPM files takes a while, so it happens once: the uint8 arrays are
cached as .npz in the cache directory ($BENCH_CACHE_DIR), keyed by the resolved root, the file
counts and the size. Training never mirrors images: mirrored signs (keep left / keep right,
turn left / turn right) are other classes or no sign at all.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import bench
from bench import DatasetSplits
from bench_plugins.datasets._torchvision_files import cached_arrays, make_splits, not_found, root_candidates

NUM_CLASSES = 43
TRAIN_FOLDER = Path("gtsrb", "GTSRB", "Training")
TEST_FOLDER = Path("gtsrb", "GTSRB", "Final_Test", "Images")
TEST_LABELS = Path("gtsrb", "GT-final_test.csv")
DOWNLOAD_HINT = (
    "Get GTSRB-Training_fixed.zip, GTSRB_Final_Test_Images.zip and GTSRB_Final_Test_GT.zip from "
    "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/ and unzip all three into "
    "<root>/gtsrb/, or run torchvision.datasets.GTSRB(root, split=..., download=True) for both splits "
    "once on a machine with network access."
)


class Gtsrb(bench.Dataset):
    name = "gtsrb"
    description = "GTSRB traffic signs, 43 classes, RGB resized to 32x32 (official files, decoded once and cached)"
    horizontal_flip = False  # a mirrored sign is another sign (keep left / keep right) or none

    @dataclass(frozen=True)
    class Options:
        root: str = bench.option("", "folder holding gtsrb/ (default: $BENCH_GTSRB_ROOT, else ./data)", path=True)
        image_size: int = bench.option(32, "side in pixels every image is resized to", min=8, max=256)
        train_images: int = bench.option(0, "use only this many training images (seeded subset; 0: all)", min=0)
        test_images: int = bench.option(0, "use only this many test images (seeded subset; 0: all)", min=0)

    def load(self) -> DatasetSplits:
        looked = []
        for root, origin in root_candidates(self.name, self.options.root, ("gtsrb",)):
            missing = [str(p) for p in (TRAIN_FOLDER, TEST_FOLDER) if not (root / p).is_dir()]
            missing += [str(TEST_LABELS)] if not (root / TEST_LABELS).is_file() else []
            if not missing:
                return self._load_from(root)
            looked.append(f"{root}/ from {origin}, missing {', '.join(missing)}")
        raise not_found(self.name, looked, DOWNLOAD_HINT)

    def _load_from(self, root: Path) -> DatasetSplits:
        size = self.options.image_size
        counts = [sum(1 for _ in (root / folder).rglob("*.ppm")) for folder in (TRAIN_FOLDER, TEST_FOLDER)]
        fingerprint = f"{root.resolve()}:{counts[0]}:{counts[1]}:{size}"
        arrays = cached_arrays(self.name, fingerprint, lambda: _decode_splits(root, size))
        return make_splits(
            arrays,
            NUM_CLASSES,
            f"GTSRB official files (torchvision reader, {root / 'gtsrb'}), resized to {size}x{size}",
            dataset=self.name,
            train_images=self.options.train_images,
            test_images=self.options.test_images,
        )


def _decode_splits(root: Path, size: int) -> dict[str, np.ndarray]:
    from PIL import Image
    from torchvision.datasets import GTSRB

    def resize(image):
        return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)

    arrays = {}
    for split in ("train", "test"):
        ds = GTSRB(str(root), split=split, transform=resize, download=False)
        # Threads suffice: Pillow releases the GIL while it decodes and resizes.
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            samples = list(pool.map(ds.__getitem__, range(len(ds))))
        images = np.stack([image for image, _ in samples]) if samples else np.zeros((0, size, size, 3), np.uint8)
        arrays[f"x_{split}"] = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
        arrays[f"y_{split}"] = np.array([label for _, label in samples], dtype=np.int64)
    return arrays


@bench.hookimpl
def register_datasets(register):
    register(Gtsrb)
