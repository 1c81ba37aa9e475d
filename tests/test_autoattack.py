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
    # a short Square keeps the test fast; the other three attacks run as in the standard set
    aa = AutoAttack(AutoAttack.Options(eps=0.1, subset=12, square_queries=30)).evaluate(model, subset, CTX, {})
    pgd = PGD(PGD.Options(eps=0.1, step=0.025, subset=12)).evaluate(model, subset, CTX, {})
    assert 0 <= aa["robust_acc"] <= pgd["robust_acc"] + 1 / 12
    assert aa["robust_acc"] < 0.9  # eps 0.1 on 8x8 digits breaks many images
    assert 0 < aa["asr"] <= 1


def test_protocol_names_the_attacks_that_ran():
    text = AutoAttack(AutoAttack.Options(version=Version.STANDARD)).describe_protocol()
    assert "APGD-CE, APGD-T, FAB-T, Square" in text and "torchattacks" in text and "first 1000" in text
    assert "not the standard" not in text
    assert "not the standard" in AutoAttack(AutoAttack.Options(square_queries=10)).describe_protocol()


def test_stochastic_models_get_the_rand_version(digits_model):
    model, _ = digits_model
    sap = SAP().apply(model, None, DefenseContext(device=torch.device("cpu"), seed=0,
                                                                          num_classes=10))
    assert AutoAttack()._version(sap) == "rand"
    assert AutoAttack()._version(model) == "standard"
