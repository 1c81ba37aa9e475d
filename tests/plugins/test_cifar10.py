import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from bench.errors import DataNotFoundError
from bench_plugins.datasets import cifar10 as cifar10_module
from bench_plugins.datasets.cifar10 import Cifar10

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_image_folder(root, per_class=2):
    """Class k's images hold pixel values near 20 * k; returns the train pixels, HWC, class by class."""
    rng = np.random.default_rng(0)
    written = {}
    for split in ("train", "test"):
        for label, name in enumerate(CLASSES):
            folder = root / "cifar10" / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = np.full((32, 32, 3), label * 20, dtype=np.uint8) + rng.integers(
                    0, 5, (32, 32, 3), dtype=np.uint8
                )
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")
                written.setdefault(split, []).append(pixels)
    return np.stack(written["train"])


def test_reads_an_image_folder_in_label_order_and_decodes_it_once(tmp_path, monkeypatch):
    train_pixels = make_image_folder(tmp_path)
    splits = Cifar10(Cifar10.Options(root=str(tmp_path))).load()
    # PNG is lossless: every pixel, channels first, with the label of its class folder
    assert torch.equal(splits.train.x, torch.from_numpy(train_pixels).permute(0, 3, 1, 2))
    assert splits.train.y.tolist() == [k for k in range(10) for _ in range(2)] == splits.test.y.tolist()
    assert splits.num_classes == 10
    assert splits.mean == pytest.approx(tuple(train_pixels.mean(axis=(0, 1, 2)) / 255), abs=1e-4)

    def no_decoding(path):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(cifar10_module, "_decode", no_decoding)
    again = Cifar10(Cifar10.Options(root=str(tmp_path))).load()
    assert torch.equal(again.train.x, splits.train.x) and torch.equal(again.test.y, splits.test.y)


def test_reads_the_tarball_and_takes_subsets(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "src")
    with tarfile.open(tmp_path / "cifar10-jpeg.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "src" / "cifar10", arcname="cifar10")
    monkeypatch.setenv("BENCH_CIFAR10_ROOT", str(tmp_path))
    full = Cifar10().load()
    splits = Cifar10(Cifar10.Options(train_images=5)).load()
    assert "JPEG copy" in splits.source
    assert len(splits.train) == 5 and torch.equal(splits.test.x, full.test.x)
    # five distinct training images of the full set, with their labels, in their order
    rows = [next(i for i in range(20) if torch.equal(full.train.x[i], image)) for image in splits.train.x]
    assert rows == sorted(set(rows)) and splits.train.y.tolist() == full.train.y[rows].tolist()
    assert rows != [0, 1, 2, 3, 4]  # a seeded draw, not the first classes' images
    assert torch.equal(Cifar10(Cifar10.Options(train_images=5)).load().train.x, splits.train.x)
    assert splits.mean == pytest.approx((splits.train.x.double().mean(dim=(0, 2, 3)) / 255).tolist(), abs=1e-4)


def test_missing_data_says_where_it_looked_and_what_to_do(tmp_path):
    with pytest.raises(DataNotFoundError) as error:
        Cifar10(Cifar10.Options(root=str(tmp_path / "nowhere"))).load()
    message = str(error.value)
    assert str(tmp_path / "nowhere") in message
    assert "cifar-10-batches-py" in message and "BENCH_CIFAR10_ROOT" in message
