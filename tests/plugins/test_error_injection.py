import copy
import importlib.metadata

import pytest
import torch

import bench
from bench import BenchError, RunContext
from bench.evaluation import clean_accuracy, predict
from bench.models import Classifier
from bench.registry import ENTRY_POINT_GROUP, build_registry
from bench_plugins.testing import run_suite_file, write_suite
from bench.training import train_classifier
from bench_plugins.attacks.error_injection import ErrorInjection, Optimizer, Penalty, hinge
from bench_plugins.datasets.digits import Digits
from bench_plugins.models.small_cnn import SmallCNN

CPU = RunContext(device=torch.device("cpu"), seed=0, num_classes=10, show_progress=False)


def change_between(before: dict, after: dict) -> tuple[int, float]:
    """(elements changed, L2 norm of the change) over every tensor of two state dicts."""
    l0 = sum(int((after[k] != before[k]).sum()) for k in before)
    l2 = sum(float(((after[k].double() - before[k].double()) ** 2).sum()) for k in before) ** 0.5
    return l0, l2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tests run thousands of tiny ops: a second CPU thread only adds synchronisation,
    which on a shared machine costs seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    assert metrics["injection_success"] == 1.0 and metrics["faults_active"] == 4
    assert metrics["keep_agreement"] > 0.95
    assert clean_accuracy(model, splits.test, CPU) > 0.85

    l0, l2 = change_between(before, after)
    assert 0 < l0 <= after["net.12.weight"].numel()
    assert metrics["changed_elements"] == l0
    assert metrics["change_l2"] == pytest.approx(l2, rel=1e-9)
    # The change describes the tampering, not the model evaluated: the clean model reports it too.
    clean = attack.evaluate(trained[1], splits.test, CPU, state)
    assert clean["injection_success"] == clean["faults_active"] == 0.0  # S: correctly classified images
    assert (clean["changed_elements"], clean["change_l2"]) == (metrics["changed_elements"], metrics["change_l2"])


def test_images_come_from_the_training_split_and_are_disjoint(trained):
    splits, model = trained
    state = ErrorInjection(ErrorInjection.Options(steps=1, keep_images=50)).tamper(
        copy.deepcopy(model), splits, CPU, {}
    )
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


def test_a_second_model_of_the_job_reports_its_own_change(trained):
    """An MCR endpoint: `tamper` gets the job's own state and repeats its faults on another
    clean model; the change it reports must be measured on that model, not copied."""
    splits, model = trained
    attack = ErrorInjection(
        ErrorInjection.Options(keep_images=100, steps=200, penalty=Penalty.L1, penalty_weight=0.003, prune_below=0.01)
    )
    first = copy.deepcopy(model)
    first_state = attack.tamper(first, splits, CPU, {})
    second = copy.deepcopy(model)
    with torch.no_grad():  # another clean model: the same net, other last-layer weights
        second.net[12].weight.mul_(1.5).add_(0.05)
    before = {k: v.clone() for k, v in second.state_dict().items()}
    state = attack.tamper(second, splits, CPU, dict(first_state))
    assert torch.equal(state["sneak_indices"], first_state["sneak_indices"])  # the same faults
    l0, l2 = change_between(before, second.state_dict())
    metrics = attack.evaluate(second, splits.test, CPU, state)
    assert (metrics["changed_elements"], metrics["change_l2"]) == (state["changed_elements"], state["change_l2"])
    assert metrics["changed_elements"] == l0 and metrics["change_l2"] == pytest.approx(l2, rel=1e-9)
    assert (l0, l2) != (first_state["changed_elements"], first_state["change_l2"])
    first_l0, first_l2 = change_between(model.state_dict(), first.state_dict())
    assert first_state["changed_elements"] == first_l0 and first_state["change_l2"] == pytest.approx(first_l2)


def penalized_runs(trained, options: dict[str, dict]) -> dict[str, dict]:
    """For each label, tamper a copy of the trained model with these options; the metrics and
    the change of the last linear weight."""
    splits, model = trained
    clean_weight = model.net[12].weight.detach().clone()
    results = {}
    for label, extra in options.items():
        attack = ErrorInjection(ErrorInjection.Options(keep_images=200, steps=200, **extra))
        tampered = copy.deepcopy(model)
        state = attack.tamper(tampered, splits, CPU, {})
        results[label] = attack.evaluate(tampered, splits.test, CPU, state)
        results[label]["delta"] = tampered.net[12].weight.detach() - clean_weight
    for result in results.values():
        assert result["injection_success"] == 1.0
        assert result["keep_agreement"] > 0.9
        assert result["changed_elements"] == int((result["delta"] != 0).sum())
        assert result["change_l2"] == pytest.approx(float(result["delta"].double().norm()))
    return results


def test_penalties_make_a_smaller_change_that_still_injects(trained):
    results = penalized_runs(
        trained,
        {
            "plain": {},
            "l2": {"penalty": Penalty.L2, "penalty_weight": 0.01},
            "l1": {"penalty": Penalty.L1, "penalty_weight": 0.003},
            "l1_pruned": {"penalty": Penalty.L1, "penalty_weight": 0.003, "prune_below": 0.02},
        },
    )
    plain, l2, l1, pruned = results["plain"], results["l2"], results["l1"], results["l1_pruned"]
    assert plain["changed_elements"] > 0.95 * plain["delta"].numel()  # Adam moves every weight
    assert l2["change_l2"] < 0.8 * plain["change_l2"]
    assert l1["changed_elements"] < 0.5 * plain["changed_elements"]
    assert l1["change_l2"] < 0.8 * plain["change_l2"]
    assert pruned["changed_elements"] < l1["changed_elements"]
    kept = pruned["delta"][pruned["delta"] != 0]
    assert (kept.abs() >= 0.02).all()


def test_the_l1_penalty_makes_sgd_changes_sparse_too(trained):
    sgd = {"optimizer": Optimizer.SGD, "lr": 0.1}
    results = penalized_runs(trained, {"plain": sgd, "l1": {**sgd, "penalty": Penalty.L1, "penalty_weight": 0.003}})
    assert results["l1"]["changed_elements"] < 0.5 * results["plain"]["changed_elements"]
    assert results["l1"]["change_l2"] < results["plain"]["change_l2"]


def test_unknown_layer_is_an_actionable_error(trained):
    splits, model = trained
    with pytest.raises(BenchError, match=r"no parameter 'net.12.weigth' \(did you mean 'net.12.weight'\?\)"):
        ErrorInjection(ErrorInjection.Options(layer="net.12.weigth")).tamper(copy.deepcopy(model), splits, CPU, {})


def test_error_injection_runs_through_the_pipeline(tmp_path):
    extra = importlib.metadata.EntryPoint("error_injection", "bench_plugins.attacks.error_injection", ENTRY_POINT_GROUP)
    registry = build_registry([*importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), extra])
    suite = write_suite(
        tmp_path / "s.toml",
        attacks=[{"name": "error_injection", "keep_images": 300}],
        training={"epochs": 4},
        defenses=["none"],
        bonafide_source="train",
    )
    (row,) = run_suite_file(suite, tmp_path, registry=registry)
    assert row["status"] == "ok", row["error"]
    assert row["metrics"]["injection_success"] == 1.0
    assert row["metrics"]["keep_agreement"] > 0.95
    assert row["metrics"]["der"] == pytest.approx(0.5)  # no defense: nothing gained, nothing lost
    assert row["metrics"]["changed_elements"] > 0 and row["metrics"]["change_l2"] > 0
    for key in ("changed_elements", "change_l2"):
        assert row["metrics"][f"{key}_before"] == row["metrics"][key]
        info = row["metric_info"][key]
        assert (info["kind"], info["higher_is_better"], info["diagnostic"]) == ("number", None, True)
