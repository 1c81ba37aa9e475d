"""The official-file dataset loaders, on tiny fake files written in the official formats."""

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from bench import DataNotFoundError
from bench_plugins.datasets import gtsrb as gtsrb_module
from bench_plugins.datasets.fashion_mnist import FashionMnist
from bench_plugins.datasets.gtsrb import Gtsrb
from bench_plugins.datasets.mnist import IDX_FILES, Mnist
from bench_plugins.datasets.svhn import Svhn

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def no_root_variables(monkeypatch, tmp_path):
    for name in ("MNIST", "FASHION_MNIST", "SVHN", "GTSRB"):
        monkeypatch.delenv(f"BENCH_{name}_ROOT", raising=False)
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # the default root ./data is then empty


def write_idx(raw, train_count=12, test_count=6):
    """The four MNIST IDX files (big-endian header, then uint8 data); returns the arrays."""
    raw.mkdir(parents=True)
    arrays = {}
    for prefix, count in (("train", train_count), ("t10k", test_count)):
        images = RNG.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = RNG.integers(0, 10, count, dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 0x0803, count, 28, 28) + images.tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x0801, count) + labels.tobytes())
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize("dataset_cls, folder", [(Mnist, "MNIST"), (FashionMnist, "FashionMNIST")])
def test_mnist_like_sets_read_the_official_idx_files(tmp_path, dataset_cls, folder):
    arrays = write_idx(tmp_path / "files" / folder / "raw")
    splits = dataset_cls(dataset_cls.Options(root=str(tmp_path / "files"))).load()
    assert splits.train.x.shape == (12, 1, 28, 28) and splits.train.x.dtype == torch.uint8
    assert np.array_equal(splits.train.x[:, 0].numpy(), arrays["train"][0])
    assert np.array_equal(splits.test.y.numpy(), arrays["t10k"][1].astype(np.int64))
    assert splits.num_classes == 10 and len(splits.mean) == 1 and not dataset_cls.horizontal_flip
    assert splits.mean[0] == pytest.approx(arrays["train"][0].mean() / 255, abs=1e-3)
    assert splits.std[0] == pytest.approx(arrays["train"][0].std(ddof=1) / 255, abs=1e-3)


def test_mnist_root_can_be_the_environment_or_the_raw_folder_itself(tmp_path, monkeypatch):
    arrays = write_idx(tmp_path / "elsewhere" / "MNIST" / "raw")
    monkeypatch.setenv("BENCH_MNIST_ROOT", str(tmp_path / "elsewhere"))
    assert np.array_equal(Mnist().load().train.x[:, 0].numpy(), arrays["train"][0])
    monkeypatch.delenv("BENCH_MNIST_ROOT")
    options = Mnist.Options(root=str(tmp_path / "elsewhere" / "MNIST" / "raw"), train_images=5)
    subset = Mnist(options).load()
    # five distinct training images, with their labels, in the files' order; the mean is theirs
    images, labels = arrays["train"]
    rows = [next(i for i in range(12) if np.array_equal(images[i], image)) for image in subset.train.x[:, 0].numpy()]
    assert len(rows) == 5 and rows == sorted(set(rows)) and subset.train.y.tolist() == labels[rows].tolist()
    assert subset.mean[0] == pytest.approx(images[rows].mean() / 255, abs=1e-4)
    assert len(subset.test) == 6


def test_missing_mnist_files_name_where_the_loader_looked_and_how_to_get_them(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in IDX_FILES:
        (raw / f"{name}.gz").write_bytes(gzip.compress(b""))
    with pytest.raises(DataNotFoundError) as error:
        Mnist(Mnist.Options(root=str(tmp_path))).load()
    message = str(error.value)
    assert str(raw) in message and "train-images-idx3-ubyte" in message
    assert "gunzip" in message and "BENCH_MNIST_ROOT" in message and "Nothing is downloaded" in message
    with pytest.raises(DataNotFoundError, match=r"data/FashionMNIST/raw/ from the default ./data"):
        FashionMnist().load()


def write_svhn(folder, counts=(10, 4)):
    from scipy.io import savemat

    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, count in zip(("train", "test"), counts):
        images = RNG.integers(0, 256, (32, 32, 3, count), dtype=np.uint8)  # the .mat layout: H, W, C, N
        labels = np.arange(1, count + 1).reshape(-1, 1) % 10 + 1  # 1..10, where 10 is the digit 0
        savemat(folder / f"{split}_32x32.mat", {"X": images, "y": labels})
        arrays[split] = (images, labels)
    return arrays


def test_svhn_reads_the_mat_files_and_maps_label_10_to_digit_0(tmp_path, monkeypatch):
    from torchvision.datasets import SVHN

    arrays = write_svhn(tmp_path / "svhn")
    monkeypatch.setattr(SVHN, "_check_integrity", lambda self: True)  # fake files cannot match the official MD5
    splits = Svhn(Svhn.Options(root=str(tmp_path))).load()
    assert splits.train.x.shape == (10, 3, 32, 32) and splits.test.x.shape == (4, 3, 32, 32)
    assert np.array_equal(splits.train.x[3].permute(1, 2, 0).numpy(), arrays["train"][0][..., 3])
    expected = arrays["train"][1].ravel() % 10
    assert splits.train.y.tolist() == expected.tolist() and 0 in splits.train.y.tolist()
    assert splits.mean == pytest.approx(tuple(arrays["train"][0].mean(axis=(0, 1, 3)) / 255), abs=1e-4)
    assert not Svhn.horizontal_flip


def test_svhn_files_that_are_not_the_official_ones_are_reported(tmp_path):
    write_svhn(tmp_path)
    with pytest.raises(DataNotFoundError, match="MD5"):
        Svhn(Svhn.Options(root=str(tmp_path))).load()
    with pytest.raises(DataNotFoundError, match=r"train_32x32.mat, test_32x32.mat.*ufldl.stanford.edu"):
        Svhn(Svhn.Options(root=str(tmp_path / "empty"))).load()


def write_gtsrb(root, test_count=5):
    """43 class folders of one PPM each, and a test folder with its CSV, in torchvision's layout."""
    base = root / "gtsrb"
    for label in range(43):
        folder = base / "GTSRB" / "Training" / f"{label:05d}"
        folder.mkdir(parents=True)
        size = (20 + label % 7, 25 + label % 5)
        Image.fromarray(np.full((size[1], size[0], 3), label * 5, np.uint8)).save(folder / f"00000_{label:05d}.ppm")
    images = base / "GTSRB" / "Final_Test" / "Images"
    images.mkdir(parents=True)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i in range(test_count):
        Image.fromarray(RNG.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(images / f"{i:05d}.ppm")
        rows.append(f"{i:05d}.ppm;30;40;5;5;25;35;{i * 7}")
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")


def test_gtsrb_resizes_every_image_and_decodes_only_once(tmp_path, monkeypatch):
    write_gtsrb(tmp_path)
    splits = Gtsrb(Gtsrb.Options(root=str(tmp_path / "gtsrb"))).load()  # the gtsrb/ folder itself works too
    assert splits.train.x.shape == (43, 3, 32, 32) and splits.test.x.shape == (5, 3, 32, 32)
    assert splits.train.y.tolist() == list(range(43)) and splits.test.y.tolist() == [0, 7, 14, 21, 28]
    assert splits.train.x[10].eq(50).all()  # a flat image stays flat through the resize
    assert splits.num_classes == 43 and not Gtsrb.horizontal_flip
    assert len(list((tmp_path / "cache").glob("gtsrb-*.npz"))) == 1

    def no_decoding(*args):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(gtsrb_module, "_decode_splits", no_decoding)
    again = Gtsrb(Gtsrb.Options(root=str(tmp_path))).load()
    assert torch.equal(again.train.x, splits.train.x)
    small = Gtsrb.Options(root=str(tmp_path), image_size=16)
    with pytest.raises(AssertionError, match="decoded again"):  # another size is another cache entry
        Gtsrb(small).load()


def test_missing_gtsrb_files_are_listed(tmp_path):
    write_gtsrb(tmp_path)
    (tmp_path / "gtsrb" / "GT-final_test.csv").unlink()
    with pytest.raises(DataNotFoundError, match=r"missing gtsrb/GT-final_test.csv.*GTSRB_Final_Test_GT.zip"):
        Gtsrb(Gtsrb.Options(root=str(tmp_path))).load()
