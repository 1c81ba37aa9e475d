"""AutoAttack through torchattacks: at least as strong as PGD, and it says what ran."""

import pytest
import torch

from bench import RunContext
from bench.context import DefenseContext
from bench.models import Classifier, InputShape, TrainRecipe
from bench.training import train_classifier
from bench_plugins.attacks.autoattack import AutoAttack, Version
from bench_plugins.attacks.pgd import PGD
from bench_plugins.datasets.digits import Digits
from bench_plugins.defenses.sap import SAP
from bench_plugins.models.small_cnn import SmallCNN

CTX = RunContext(device=torch.device("cpu"), seed=0, num_classes=10, eval_batch_size=64)


@pytest.fixture(scope="module")
def digits_model():
    data = Digits().load()
    torch.manual_seed(0)
    model = Classifier(SmallCNN(SmallCNN.Options(width=8)).build(InputShape(1, 8, 8, 10)), data.mean, data.std)
    train_classifier(model, data.train, TrainRecipe(epochs=6, batch_size=64, lr=0.05, augment=False), CTX, flip=False)
    return model, data.test


def test_autoattack_is_at_least_as_strong_as_pgd(digits_model):
    model, test = digits_model
    subset = test.subset(torch.arange(12))
    # a short budget keeps the test fast; the attacks are those of the standard set
    aa = AutoAttack(AutoAttack.Options(eps=0.1, subset=12, iterations=20, square_queries=30)).evaluate(
        model, subset, CTX, {})
    pgd = PGD(PGD.Options(eps=0.1, step=0.025, subset=12)).evaluate(model, subset, CTX, {})
    assert 0 <= aa["robust_acc"] <= pgd["robust_acc"] + 1 / 12
    assert aa["robust_acc"] < 0.9  # eps 0.1 on 8x8 digits breaks many images
    assert 0 < aa["asr"] <= 1


def test_the_reference_budget_is_set_on_every_member(digits_model):
    import torchattacks

    model, _ = digits_model
    attack, version = AutoAttack().build(model, num_classes=10, seed=0)
    members = {type(m).__name__: m for m in attack._autoattack.attacks}
    assert version == "standard" and set(members) == {"APGD", "APGDT", "FAB", "Square"}
    assert members["APGD"].steps == members["APGDT"].steps == members["FAB"].steps == 100
    assert members["APGDT"].n_target_classes == members["FAB"].n_target_classes == 9
    assert members["FAB"].multi_targeted and isinstance(members["Square"], torchattacks.Square)
    assert members["Square"].n_queries == 5000
    few_classes, _ = AutoAttack().build(model, num_classes=4, seed=0)
    assert all(m.n_target_classes == 3 for m in few_classes._autoattack.attacks if hasattr(m, "n_target_classes"))


def test_channels_last_models_and_inputs_work(digits_model):
    # the CUDA path keeps models and inputs in channels_last; FAB reshapes with .view()
    model, test = digits_model
    model = model.to(memory_format=torch.channels_last)
    small = AutoAttack(AutoAttack.Options(eps=0.3, subset=6, iterations=3, square_queries=5))
    assert 0 <= small.evaluate(model, test.subset(torch.arange(6)), CTX, {})["robust_acc"] <= 1


def test_protocol_names_the_attacks_that_ran_and_any_cut_budget():
    text = AutoAttack(AutoAttack.Options(version=Version.STANDARD)).describe_protocol()
    assert "APGD-CE, APGD-T, FAB-T, Square" in text and "torchattacks" in text and "first 1000" in text
    assert "100 iterations" in text and "NOT the standard" not in text
    cut = AutoAttack(AutoAttack.Options(iterations=10, square_queries=10)).describe_protocol()
    assert "NOT the standard budget: 10 iterations instead of 100, Square cut to 10 queries" in cut


def test_stochastic_models_get_the_rand_version(digits_model):
    model, _ = digits_model
    sap = SAP().apply(model, None, DefenseContext(device=torch.device("cpu"), seed=0,
                                                                          num_classes=10))
    assert AutoAttack()._version(sap) == "rand"
    assert AutoAttack()._version(model) == "standard"


def test_a_missing_torchattacks_is_reported_before_the_suite_runs(tmp_path, monkeypatch):
    import sys

    from click.testing import CliRunner

    from bench.cli import main
    from bench.testing import write_suite

    monkeypatch.setitem(sys.modules, "torchattacks", None)  # import torchattacks now raises ImportError
    suite = write_suite(tmp_path / "s.toml", attacks=[{"name": "autoattack", "subset": 10}], store=tmp_path / "r.db")
    result = CliRunner().invoke(main, ["run", str(suite), "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 2, result.output
    assert "pip install 'robustness-bench[autoattack]'" in result.output
    assert not (tmp_path / "r.db").exists()
