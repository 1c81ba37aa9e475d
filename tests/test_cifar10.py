import tarfile

import numpy as np
import pytest
from PIL import Image

from bench.errors import DataNotFoundError
from bench_plugins.datasets.cifar10 import Cifar10

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_image_folder(root, per_class=2):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label, name in enumerate(CLASSES):
            folder = root / "cifar10" / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = np.full((32, 32, 3), label * 20, dtype=np.uint8) + rng.integers(0, 5, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")


def test_reads_an_image_folder_in_label_order(tmp_path):
    make_image_folder(tmp_path)
    splits = Cifar10(Cifar10.Options(root=str(tmp_path))).load()
    assert tuple(splits.train.x.shape) == (20, 3, 32, 32) and len(splits.test) == 20
    assert splits.num_classes == 10
    # class k was drawn with pixel values near 20 * k
    means = [splits.train.x[splits.train.y == k].float().mean().item() for k in range(10)]
    assert all(abs(m - 20 * k - 2) < 1.5 for k, m in enumerate(means))
    again = Cifar10(Cifar10.Options(root=str(tmp_path))).load()  # from the decoded cache
    assert (again.train.x == splits.train.x).all()


def test_reads_the_tarball_and_takes_subsets(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "src")
    with tarfile.open(tmp_path / "cifar10-jpeg.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "src" / "cifar10", arcname="cifar10")
    monkeypatch.setenv("BENCH_CIFAR10_ROOT", str(tmp_path))
    splits = Cifar10(Cifar10.Options(train_images=5)).load()
    assert len(splits.train) == 5 and len(splits.test) == 20
    assert "JPEG copy" in splits.source


def test_missing_data_says_where_it_looked_and_what_to_do(tmp_path):
    with pytest.raises(DataNotFoundError) as error:
        Cifar10(Cifar10.Options(root=str(tmp_path / "nowhere"))).load()
    message = str(error.value)
    assert str(tmp_path / "nowhere") in message
    assert "cifar-10-batches-py" in message and "BENCH_CIFAR10_ROOT" in message
