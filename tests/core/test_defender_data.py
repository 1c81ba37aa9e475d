"""A defense gets what it declares it may use (`bench.DefenderData`) and nothing more."""

import importlib.metadata

import pytest
import torch
from click.testing import CliRunner

import bench
from bench.cli import main
from bench.registry import ENTRY_POINT_GROUP, build_registry
from bench.suite import load_suite
from bench_plugins.testing import TINY_ATTACK, run_suite_file, write_suite

SEEN: dict[str, dict] = {}


class DataFree(bench.Defense):
    name = "data_free_probe"
    description = "records what it was given; returns the model"
    defender_data = bench.DefenderData.NONE

    def apply(self, model, bonafide, ctx):
        SEEN["data_free"] = {"images": len(bonafide)}
        return model


class TrainsItsOwn(bench.Defense):
    """Trains the fresh model it is given on the poisoned training set, having removed the
    images with a white patch where BadNets stamps its trigger (a filter that knows the
    trigger: only for this test, to score detection against a known answer)."""

    name = "own_training_probe"
    description = "records what it was given; trains on it"
    defender_data = bench.DefenderData.POISONED_TRAINING_SET

    def apply(self, model, train, ctx):
        from bench.toolkit import train_classifier

        from bench.toolkit import clean_accuracy

        SEEN["own_training"] = {
            "images": len(train),
            "labels": train.y.bincount().tolist(),
            "given_model_accuracy": clean_accuracy(model, train, ctx),
        }
        corner = train.x[:, :, -3:-1, -3:-1].float().mean(dim=(1, 2, 3))  # 2x2 trigger, margin 1
        removed = (corner > 254).nonzero().squeeze(1)
        keep = torch.ones(len(train), dtype=torch.bool, device=train.y.device)
        keep[removed] = False
        train_classifier(model, train.subset(keep.nonzero().squeeze(1)), ctx.recipe, ctx, flip=False)
        return bench.Defended(model, removed_training_indices=removed)


@pytest.fixture
def registry():
    registry = build_registry(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    for cls in (DataFree, TrainsItsOwn):
        registry.register(cls, plugin="test", package="tests")
    return registry


def test_a_data_free_defense_gets_no_images_and_is_not_repeated_per_bonafide_size(tmp_path, registry):
    suite = write_suite(tmp_path / "s.toml", defenses=["data_free_probe", "finetune"], bonafide_size=[50, 20])
    suite.write_text(suite.read_text().replace('name = "finetune"', 'name = "finetune"\nepochs = 1'))
    rows = run_suite_file(suite, tmp_path, registry=registry)
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    probe = [r for r in rows if r["defense"] == "data_free_probe"]
    assert len(probe) == 1 and probe[0]["bonafide_size"] == 0 and probe[0]["notes"]["defender_data"] == "none"
    assert SEEN["data_free"] == {"images": 0}


def test_a_defense_on_the_poisoned_training_set_gets_a_fresh_model_and_is_scored_on_what_it_removed(tmp_path, registry):
    suite = write_suite(tmp_path / "s.toml", defenses=["own_training_probe"], bonafide_size=50)
    (row,) = run_suite_file(suite, tmp_path, registry=registry)
    assert row["status"] == "ok", row["error"]
    seen = SEEN["own_training"]
    # the whole training set, as poisoned: the target class (0) gained the poisoned images
    assert seen["images"] == len(registry.get("dataset", "digits").cls().load().train)
    assert seen["labels"][0] > max(seen["labels"][1:])
    # a fresh model, not the attacked one (which fits its training set): about chance accuracy
    assert seen["given_model_accuracy"] < 0.3
    m = row["metrics"]
    assert m["detection_tpr"] == pytest.approx(1.0) and m["detection_precision"] == pytest.approx(1.0)
    assert m["detection_fpr"] < 0.05
    assert row["metric_info"]["detection_tpr"]["diagnostic"]
    assert row["notes"]["defender_data"] == "poisoned_training_set"
    assert m["asr"] < 0.5 < m["asr_before"]  # trained without the poison, the backdoor is gone
    report = CliRunner().invoke(main, ["report", str(tmp_path / "results.db")])
    assert "| training set |" in report.output and "Detection TPR" in report.output


def test_a_suite_pairing_a_training_set_defense_with_an_attack_that_poisons_nothing_is_refused(tmp_path, registry):
    from bench.runner import check_suite

    suite = write_suite(
        tmp_path / "s.toml", attacks=[TINY_ATTACK, {"name": "pgd", "steps": 1}], defenses=["own_training_probe"]
    )
    refused = r"own_training_probe.*'pgd\(steps=1\)' \(test_time\) poisons no training data"
    with pytest.raises(bench.SuiteError, match=refused):
        check_suite(load_suite(suite, registry), registry, device="cpu")


def test_a_bonafide_sweep_without_a_defense_that_uses_bonafide_images_is_refused(tmp_path, registry):
    suite = write_suite(tmp_path / "s.toml", defenses=["none", "data_free_probe"], bonafide_size=[50, 20])
    with pytest.raises(bench.SuiteError, match=r"bonafide_size sweeps \[50, 20\].*data_free_probe: none"):
        load_suite(suite, registry)


def test_a_training_set_defense_is_refused_against_an_attack_that_controls_training(tmp_path, registry):
    from bench.runner import check_suite

    suite = write_suite(tmp_path / "s.toml", attacks=["wanet"], defenses=["own_training_probe"])
    with pytest.raises(bench.SuiteError, match="'wanet' controls training"):
        check_suite(load_suite(suite, registry), registry, device="cpu")
