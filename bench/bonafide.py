"""The defender's bonafide data: how large its pool is (known before any training, so the
preflight can refuse an impossible size) and the seeded draw of the bonafide images and the
evaluation images from it."""

from __future__ import annotations

import hashlib

import torch

from bench.data import DatasetSplits, ImageData
from bench.errors import BenchError
from bench.jobs import BonafideSource


BONAFIDE_POOL_ORIGIN = {
    BonafideSource.TEST_HALF: "half of the test set",
    BonafideSource.TRAIN: "training images the attack left alone",
}


def bonafide_pool_size(splits: DatasetSplits, source: BonafideSource, withheld: int) -> int:
    """How many images the defender's pool has, `withheld` training images being the attack's
    (poisoned or measured): what `split_bonafide` draws from, known before any training."""
    return len(splits.test) // 2 if source is BonafideSource.TEST_HALF else len(splits.train) - withheld


def check_bonafide_size(size: int, pool: int, source: BonafideSource) -> None:
    if size > pool:
        raise BenchError(
            f"bonafide_size {size} is more than the {pool} images available "
            f"({BONAFIDE_POOL_ORIGIN[source]}); lower [suite].bonafide_size"
        )


def _bonafide_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(hashlib.sha256(f"{seed}:bonafide".encode()).hexdigest()[:15], 16))


def bonafide_test_indices(splits: DatasetSplits, size: int, seed: int) -> torch.Tensor:
    """The test images a `test_half` bonafide set of `size` drawn with `seed` holds (what
    `split_bonafide` gives the defender), so analyses can keep them out of their evaluation."""
    return torch.randperm(len(splits.test), generator=_bonafide_generator(seed))[:size]


def split_bonafide(
    splits: DatasetSplits, withheld_indices: torch.Tensor | None, source: BonafideSource, size: int, seed: int
) -> tuple[ImageData, ImageData]:
    """(bonafide set for the defender, evaluation set). `test_half`: a seeded half of the test
    set is the defender's pool, the other half is evaluated. `train`: the pool is the training
    images the attack neither altered nor measures itself on, and the whole test set is
    evaluated."""
    generator = _bonafide_generator(seed)
    withheld = 0 if withheld_indices is None else len(withheld_indices.unique())
    check_bonafide_size(size, bonafide_pool_size(splits, source, withheld), source)
    if source is BonafideSource.TEST_HALF:
        order = torch.randperm(len(splits.test), generator=generator)
        half = len(order) // 2
        return splits.test.subset(order[:half][:size]), splits.test.subset(order[half:])
    candidates = torch.ones(len(splits.train), dtype=torch.bool)
    if withheld_indices is not None:
        candidates[withheld_indices.cpu()] = False
    pool = candidates.nonzero().squeeze(1)[torch.randperm(int(candidates.sum()), generator=generator)]
    return splits.train.subset(pool[:size]), splits.test
