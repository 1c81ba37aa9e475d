from bench.expansion import expand
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
    # 2 models x 2 poison rates x 2 seeds x (none once + finetune per bonafide size), each once
    expected = {
        (model, attack, seed, defense, size)
        for model in ("small_cnn", "small_cnn(width=8)")
        for attack in ("badnets(poison_rate=0.05)", "badnets")  # the default rate is not repeated
        for seed in (0, 1)
        for defense, size in (("none", 0), ("finetune", 100), ("finetune", 50))
    }
    found = [(j.model.label, j.attack.label, j.seed, j.defense.name, j.bonafide_size) for j in jobs]
    assert len(found) == len(expected) == 24 and set(found) == expected
    assert len({job.key for job in jobs}) == len(jobs)
    assert {j.attack.label: j.attack.config()["options"]["poison_rate"] for j in jobs} == {
        "badnets(poison_rate=0.05)": 0.05,
        "badnets": 0.1,
    }


def test_defense_without_bonafide_is_not_repeated_per_size(registry):
    jobs = expand(suite(registry))
    assert sorted(j.bonafide_size for j in jobs if j.defense.name == "none") == [0] * 8
    assert sorted(j.bonafide_size for j in jobs if j.defense.name == "finetune") == [50] * 8 + [100] * 8


def test_exclude_drops_matching_jobs_only(registry):
    jobs = expand(
        suite(
            registry, exclude=[{"defense": "finetune", "bonafide_size": 50}, {"seed": 1, "model": "small_cnn(width=8)"}]
        )
    )
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
    attacks = [{"name": "badnets", "poison_rate": [0.05, 0.1]}, {"name": "pgd"}, {"name": "fgsm"}]
    jobs = expand(suite(registry, attacks=attacks, models=[{"name": "small_cnn"}]))
    models = {}
    for j in jobs:
        models.setdefault(j.attack.label, {}).setdefault(j.seed, set()).add(str(j.model_config()))
    assert set(models) == {"badnets(poison_rate=0.05)", "badnets", "pgd", "fgsm"}
    # whatever the defense and bonafide size, the jobs of one attack and seed share one model
    assert all(len(per_seed) == 1 for per_attack in models.values() for per_seed in per_attack.values())
    for seed in (0, 1):
        assert models["pgd"][seed] == models["fgsm"][seed]
        assert models["badnets(poison_rate=0.05)"][seed] != models["badnets"][seed]
        assert models["pgd"][seed] != models["badnets"][seed]
    assert models["pgd"][0] != models["pgd"][1]
