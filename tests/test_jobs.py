from bench.jobs import expand
from bench.suite import parse_suite
from pathlib import Path


def suite(registry, **overrides):
    data = {
        "suite": {"seeds": [0, 1], "bonafide_size": [100, 50]},
        "datasets": [{"name": "digits"}],
        "models": [{"name": "small_cnn"}, {"name": "small_cnn", "width": 8}],
        "attacks": [{"name": "badnets", "poison_rate": [0.05, 0.1]}],
        "defenses": [{"name": "none"}, {"name": "finetune"}],
    }
    data.update(overrides)
    return parse_suite(data, Path("s.toml"), registry)


def test_cross_product_with_sweeps(registry):
    jobs = expand(suite(registry))
    # 2 models x 2 poison rates x 2 seeds x (none once + finetune per bonafide size)
    assert len(jobs) == 2 * 2 * 2 * (1 + 2)
    assert len({job.key for job in jobs}) == len(jobs)
    assert {job.attack.label for job in jobs} == {"badnets(poison_rate=0.05)", "badnets"}  # the default is not repeated
    assert {job.model.label for job in jobs} == {"small_cnn", "small_cnn(width=8)"}


def test_defense_without_bonafide_is_not_repeated_per_size(registry):
    jobs = [j for j in expand(suite(registry)) if j.defense.name == "none"]
    assert {j.bonafide_size for j in jobs} == {0}


def test_exclude_drops_matching_jobs_only(registry):
    jobs = expand(suite(registry, exclude=[{"defense": "finetune", "bonafide_size": 50}, {"seed": 1, "model": "small_cnn(width=8)"}]))
    assert not [j for j in jobs if j.defense.name == "finetune" and j.bonafide_size == 50]
    assert not [j for j in jobs if j.seed == 1 and j.model.label == "small_cnn(width=8)"]
    assert len(jobs) == 24 - 8 - 6 + 2  # the two rules overlap on 2 jobs


def test_expansion_is_deterministic_and_training_overrides_apply(registry):
    a = expand(suite(registry, training={"epochs": 3}))
    b = expand(suite(registry, training={"epochs": 3}))
    assert [j.key for j in a] == [j.key for j in b]
    assert all(j.recipe.epochs == 3 for j in a)
    assert all(j.recipe.batch_size == 64 for j in a)  # the small_cnn recipe's default is kept


def test_test_time_attacks_share_the_trained_model_but_training_attacks_do_not(registry):
    jobs = expand(suite(registry))
    by_rate = {}
    for j in jobs:
        by_rate.setdefault(j.attack.label, set()).add(str(j.model_config()))
    assert by_rate["badnets(poison_rate=0.05)"].isdisjoint(by_rate["badnets"])
