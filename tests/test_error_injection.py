import copy
import importlib.metadata

import pytest
import torch

import bench
from bench import BenchError, RunContext
from bench.evaluation import clean_accuracy, predict
from bench.models import Classifier
from bench.registry import ENTRY_POINT_GROUP, build_registry
from bench.testing import run_suite_file, write_suite
from bench.training import train_classifier
from bench_plugins.attacks.error_injection import ErrorInjection, hinge
from bench_plugins.datasets.digits import Digits
from bench_plugins.models.small_cnn import SmallCNN

CPU = RunContext(device=torch.device("cpu"), seed=0, num_classes=10, show_progress=False)


@pytest.fixture(scope="module")
def trained():
    """small_cnn (width 8) trained briefly on digits: (splits, model)."""
    torch.manual_seed(0)
    splits = Digits().load()
    net = SmallCNN(SmallCNN.Options(width=8)).build(bench.InputShape(1, 8, 8, 10))
    model = Classifier(net, splits.mean, splits.std)
    recipe = bench.TrainRecipe(epochs=4, batch_size=128, lr=0.1, augment=False)
    train_classifier(model, splits.train, recipe, CPU, flip=False)
    assert clean_accuracy(model, splits.test, CPU) > 0.9
    return splits, model


def test_hinge_is_zero_only_beyond_the_margin():
    logits = torch.tensor([[3.0, 1.0, 0.0], [1.0, 1.5, 0.0]])
    labels = torch.tensor([0, 0])
    assert hinge(logits, labels, margin=1.0).tolist() == [0.0, 1.5]
    assert hinge(logits, labels, margin=2.5).tolist() == [0.5, 3.0]


def test_injection_changes_only_the_last_linear_weight_and_hits_its_targets(trained):
    splits, model = trained
    model = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attack = ErrorInjection()
    state = attack.tamper(model, splits, CPU, {})
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["net.12.weight"] and state["layer"] == "net.12.weight"

    sneak_idx = state["poisoned_indices"]
    assert len(sneak_idx) == 4 and len(state["keep_images"]) == 996
    assert state["sneak_images"].dtype == torch.uint8
    assert (state["injected_labels"] != state["sneak_labels"]).all()
    assert torch.equal(predict(model, state["sneak_images"], CPU), state["injected_labels"])
    metrics = attack.evaluate(model, splits.test, CPU, state)
    assert metrics["injection_success"] == 1.0
    assert metrics["keep_agreement"] > 0.95
    assert clean_accuracy(model, splits.test, CPU) > 0.85


def test_images_come_from_the_training_split_and_are_disjoint(trained):
    splits, model = trained
    state = ErrorInjection(ErrorInjection.Options(steps=1, keep_images=50)).tamper(copy.deepcopy(model), splits, CPU, {})
    train_rows = {tuple(img.flatten().tolist()) for img in splits.train.x}
    sneak = [tuple(img.flatten().tolist()) for img in state["sneak_images"]]
    keep = [tuple(img.flatten().tolist()) for img in state["keep_images"]]
    assert set(sneak) <= train_rows and set(keep) <= train_rows
    assert not set(sneak) & set(keep)
    for index in state["poisoned_indices"].tolist():
        assert tuple(splits.train.x[index].flatten().tolist()) in sneak
    assert len(keep) == 50


def test_a_named_layer_is_the_only_one_modified(trained):
    splits, model = trained
    model = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attack = ErrorInjection(ErrorInjection.Options(layer="7.weight", steps=20, keep_images=100))
    state = attack.tamper(model, splits, CPU, {})
    after = model.state_dict()
    assert state["layer"] == "net.7.weight"  # the classifier wrapper's prefix is optional
    assert [k for k in before if not torch.equal(before[k], after[k])] == ["net.7.weight"]


def test_unknown_layer_is_an_actionable_error(trained):
    splits, model = trained
    with pytest.raises(BenchError, match=r"no parameter 'net.12.weigth' \(did you mean 'net.12.weight'\?\)"):
        ErrorInjection(ErrorInjection.Options(layer="net.12.weigth")).tamper(copy.deepcopy(model), splits, CPU, {})


def test_error_injection_runs_through_the_pipeline(tmp_path):
    extra = importlib.metadata.EntryPoint("error_injection", "bench_plugins.attacks.error_injection",
                                          ENTRY_POINT_GROUP)
    registry = build_registry([*importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), extra])
    suite = write_suite(tmp_path / "s.toml", attacks=[{"name": "error_injection", "keep_images": 300}],
                        training={"epochs": 4}, defenses=["none"], bonafide_source="train")
    (row,) = run_suite_file(suite, tmp_path, registry=registry)
    assert row["status"] == "ok", row["error"]
    assert row["metrics"]["injection_success"] == 1.0
    assert row["metrics"]["keep_agreement"] > 0.95
    assert row["metrics"]["der"] == pytest.approx(0.5)  # no defense: nothing gained, nothing lost
