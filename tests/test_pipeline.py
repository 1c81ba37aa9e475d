"""The pipeline's guarantees: a second attacked model carries the same attack, the defender's
bonafide set never holds what the attack touched, cached artifacts follow data and device."""

from pathlib import Path

import torch

from bench.cache import ArtifactCache
from bench.data import DatasetSplits, ImageData
from bench.jobs import expand
from bench.pipeline import JobEnvironment, attacked_model, load_dataset, model_key, split_bonafide
from bench.suite import parse_suite


def badnets_job(registry):
    suite = parse_suite({"suite": {"seeds": [0]}, "training": {"epochs": 1}, "datasets": ["digits"],
                         "models": [{"name": "small_cnn", "width": 4}],
                         "attacks": [{"name": "badnets", "trigger_size": 2}], "defenses": ["mcr"]},
                        Path("s.toml"), registry)
    return expand(suite)[0]


def test_second_attacked_model_has_the_same_poisoned_data_but_its_own_training(registry, tmp_path):
    job = badnets_job(registry)
    env = JobEnvironment(ArtifactCache(tmp_path), torch.device("cpu"), registry, show_progress=False)
    splits = load_dataset(job, env.device)
    first, first_state, _ = attacked_model(job, 0, splits, env)
    second, second_state, _ = attacked_model(job, 1, splits, env)
    assert torch.equal(first_state["poisoned_indices"], second_state["poisoned_indices"])
    assert not torch.equal(first.net[0].weight, second.net[0].weight)
    # building the second model (a cache miss) does not disturb the caller's random stream
    torch.manual_seed(7)
    attacked_model(job, 2, splits, env)
    drawn_after_miss = torch.rand(3)
    torch.manual_seed(7)
    attacked_model(job, 2, splits, env)  # now a hit
    assert torch.equal(torch.rand(3), drawn_after_miss)


def test_bonafide_from_training_data_leaves_out_every_withheld_image():
    n = 200
    train = ImageData(torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous(),
                      torch.arange(n) % 10)
    test = ImageData(torch.zeros(40, 1, 2, 2, dtype=torch.uint8), torch.arange(40) % 10)
    splits = DatasetSplits(train, test, 10, (0.5,), (0.25,), "test")
    withheld = torch.arange(0, n, 2)  # every even image was poisoned or reserved
    bonafide, evaluation = split_bonafide(splits, withheld, "train", size=100, seed=0)
    ids = bonafide.x[:, 0, 0, 0].long()
    assert len(ids) == 100 and (ids % 2 == 1).all()
    assert len(evaluation) == 40


def test_test_half_split_never_overlaps():
    test = ImageData(torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1).contiguous(), torch.arange(100) % 10)
    splits = DatasetSplits(test, test, 10, (0.5,), (0.25,), "test")
    bonafide, evaluation = split_bonafide(splits, None, "test_half", size=50, seed=3)
    assert set(bonafide.x.flatten().tolist()).isdisjoint(evaluation.x.flatten().tolist())
    assert len(bonafide) + len(evaluation) == 100


def test_model_cache_key_follows_the_data_and_the_device(registry):
    job = badnets_job(registry)
    splits = load_dataset(job, torch.device("cpu"))
    other_pixels = DatasetSplits(splits.train, splits.test, 10, splits.mean, splits.std, splits.source,
                                 fingerprint="different")
    key = model_key(job, 0, splits, torch.device("cpu"), registry)
    assert key == model_key(job, 0, splits, torch.device("cpu"), registry)
    assert key != model_key(job, 0, other_pixels, torch.device("cpu"), registry)
    assert key != model_key(job, 0, splits, torch.device("cuda"), registry)
    assert key != model_key(job, 1, splits, torch.device("cpu"), registry)


def test_second_model_of_an_error_injection_job_carries_the_same_faults(registry, tmp_path):
    suite = parse_suite({"suite": {"seeds": [0]}, "training": {"epochs": 2}, "datasets": ["digits"],
                         "models": [{"name": "small_cnn", "width": 4}],
                         "attacks": [{"name": "error_injection", "keep_images": 50, "steps": 30}],
                         "defenses": ["mcr"]}, Path("s.toml"), registry)
    (job,) = expand(suite)
    env = JobEnvironment(ArtifactCache(tmp_path), torch.device("cpu"), registry, show_progress=False)
    splits = load_dataset(job, env.device)
    _, first, _ = attacked_model(job, 0, splits, env)
    _, second, _ = attacked_model(job, 1, splits, env)
    for key in ("sneak_indices", "keep_indices", "injected_labels"):
        assert torch.equal(first[key], second[key]), key
