"""The job stages' and artifacts' guarantees: a second attacked model carries the same attack, the defender's
bonafide set never holds what the attack touched, cached artifacts follow data and device."""

from pathlib import Path

import torch

from bench.artifacts import ArtifactCache, JobEnvironment, attacked_model, load_dataset, model_key, split_bonafide
from bench.data import DatasetSplits, ImageData
from bench.expansion import expand
from bench.jobs import BonafideSource
from bench.suite import parse_suite


def badnets_jobs(registry):
    suite = parse_suite(
        {
            "suite": {"seeds": [0]},
            "training": {"epochs": 1},
            "datasets": ["digits"],
            "models": [{"name": "small_cnn", "width": 4}],
            "attacks": [{"name": "badnets", "trigger_size": 2}],
            "defenses": ["mcr", "none"],
        },
        Path("s.toml"),
        registry,
    )
    return expand(suite)


def badnets_job(registry):
    return badnets_jobs(registry)[0]


def test_second_attacked_model_has_the_same_poisoned_data_but_its_own_training(registry, tmp_path, one_cpu_thread):
    job = badnets_job(registry)
    env = JobEnvironment(ArtifactCache(tmp_path), torch.device("cpu"), show_progress=False)
    splits = load_dataset(job, env.device)
    first, first_state, _, _ = attacked_model(job, 0, splits, env)
    second, second_state, _, _ = attacked_model(job, 1, splits, env)
    assert len(first_state["poisoned_indices"]) == round(0.1 * len(splits.train))  # the default poison rate
    assert torch.equal(first_state["poisoned_indices"], second_state["poisoned_indices"])
    assert not torch.equal(first.net[0].weight, second.net[0].weight)
    # building the second model (a cache miss) does not disturb the caller's random stream
    torch.manual_seed(7)
    built, _, hit, _ = attacked_model(job, 2, splits, env)
    drawn_after_miss = torch.rand(3)
    assert not hit
    torch.manual_seed(7)
    cached, _, hit, _ = attacked_model(job, 2, splits, env)
    assert hit and torch.equal(torch.rand(3), drawn_after_miss)
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), cached.state_dict().values()))


def test_bonafide_from_training_data_leaves_out_every_withheld_image():
    n = 200
    train = ImageData(
        torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous(), torch.arange(n) % 10
    )
    test = ImageData(torch.zeros(40, 1, 2, 2, dtype=torch.uint8), torch.arange(40) % 10)
    splits = DatasetSplits(train, test, 10, (0.5,), (0.25,), "test")
    withheld = torch.arange(0, n, 2)  # every even image was poisoned or reserved
    bonafide, evaluation = split_bonafide(splits, withheld, BonafideSource.TRAIN, size=100, seed=0)
    ids = bonafide.x[:, 0, 0, 0].long()
    assert sorted(ids.tolist()) == list(range(1, n, 2))  # all 100 odd images, none twice
    assert torch.equal(bonafide.y, ids % 10)  # each with its own label
    assert torch.equal(evaluation.x, test.x) and torch.equal(evaluation.y, test.y)  # the whole test set
    smaller, _ = split_bonafide(splits, withheld, BonafideSource.TRAIN, size=30, seed=0)
    other_seed, _ = split_bonafide(splits, withheld, BonafideSource.TRAIN, size=30, seed=1)
    assert (smaller.x[:, 0, 0, 0] % 2 == 1).all() and not torch.equal(smaller.x, other_seed.x)


def test_test_half_split_evaluates_on_the_half_the_defender_never_sees():
    test = ImageData(torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1).contiguous(), torch.arange(100) % 10)
    splits = DatasetSplits(test, test, 10, (0.5,), (0.25,), "test")
    bonafide, evaluation = split_bonafide(splits, None, BonafideSource.TEST_HALF, size=50, seed=3)
    bonafide_ids, evaluation_ids = bonafide.x.flatten().tolist(), evaluation.x.flatten().tolist()
    assert len(set(bonafide_ids)) == len(set(evaluation_ids)) == 50
    assert sorted(bonafide_ids + evaluation_ids) == list(range(100))
    assert torch.equal(evaluation.y, evaluation.x.flatten().long() % 10)  # images keep their labels
    # a smaller bonafide set comes from the same half; the evaluation half does not grow
    fewer, same_evaluation = split_bonafide(splits, None, BonafideSource.TEST_HALF, size=10, seed=3)
    assert torch.equal(same_evaluation.x, evaluation.x) and set(fewer.x.flatten().tolist()) <= set(bonafide_ids)
    _, other_evaluation = split_bonafide(splits, None, BonafideSource.TEST_HALF, size=50, seed=4)
    assert not torch.equal(other_evaluation.x.sort(0).values, evaluation.x.sort(0).values)  # seeded halves


def test_model_cache_key_follows_the_data_and_the_device_not_the_defense(registry):
    job, job_without_defense = badnets_jobs(registry)
    splits = load_dataset(job, torch.device("cpu"))
    assert model_key(job_without_defense, 0, splits, torch.device("cpu")) == model_key(
        job, 0, splits, torch.device("cpu")
    )  # every defense repairs the same model
    other_pixels = DatasetSplits(
        splits.train, splits.test, 10, splits.mean, splits.std, splits.source, fingerprint="different"
    )
    key = model_key(job, 0, splits, torch.device("cpu"))
    assert key == model_key(job, 0, splits, torch.device("cpu"))
    assert key != model_key(job, 0, other_pixels, torch.device("cpu"))
    assert key != model_key(job, 0, splits, torch.device("cuda"))
    assert key != model_key(job, 1, splits, torch.device("cpu"))


def test_second_model_of_an_error_injection_job_carries_the_same_faults(registry, tmp_path, one_cpu_thread):
    suite = parse_suite(
        {
            "suite": {"seeds": [0]},
            "training": {"epochs": 2},
            "datasets": ["digits"],
            "models": [{"name": "small_cnn", "width": 4}],
            "attacks": [{"name": "error_injection", "keep_images": 50, "steps": 30}],
            "defenses": ["mcr"],
        },
        Path("s.toml"),
        registry,
    )
    (job,) = expand(suite)
    env = JobEnvironment(ArtifactCache(tmp_path), torch.device("cpu"), show_progress=False)
    splits = load_dataset(job, env.device)
    _, first, _, _ = attacked_model(job, 0, splits, env)
    _, second, _, _ = attacked_model(job, 1, splits, env)
    assert (len(first["sneak_indices"]), len(first["keep_indices"])) == (4, 50)
    for key in ("sneak_indices", "keep_indices", "injected_labels"):
        assert torch.equal(first[key], second[key]), key
