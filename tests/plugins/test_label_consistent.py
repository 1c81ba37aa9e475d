import importlib.metadata

import pytest
import torch
import torch.nn.functional as F

from bench import BenchError, RunContext
from bench.evaluation import to_model_input
from bench.registry import ENTRY_POINT_GROUP, build_registry
from bench.toolkit import pgd_attack
from bench_plugins.attacks.label_consistent import CORNER_BLOCK, LabelConsistent, four_corner_pattern
from bench_plugins.datasets.digits import Digits
from bench_plugins.testing import run_suite_file, trained_digits_model, write_suite

CPU = RunContext(device=torch.device("cpu"), seed=0, num_classes=10, show_progress=False)
# A tiny robust model; on 8x8 digits 8/255 hardly moves a clean model, so it is trained (and
# checked) at 32/255. The perturbation of the poisoned images keeps the reference's 8/255.
QUICK = dict(
    robust_model="small_cnn",
    robust_width=8,
    robust_epochs=4,
    robust_eps=32 / 255,
    robust_step=8 / 255,
    robust_steps=5,
    steps=20,
    step=2 / 255,
)
EPS_LEVELS = 8  # 8/255


@pytest.fixture(scope="module")
def poisoned():
    """(attack, clean splits, poisoned training set, state): half of class 0 poisoned."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    attack = LabelConsistent(LabelConsistent.Options(poison_rate=0.5, **QUICK))
    splits = Digits().load()
    train, state = attack.poison(splits.train, CPU)
    torch.set_num_threads(threads)
    return attack, splits, train, state


def test_the_pattern_is_the_references_all_corners_trigger():
    pattern = four_corner_pattern(32, 32)
    # The reference's coordinates (row, column; negative from the far side) with their signs.
    for (row, column), sign in [((0, 0), 1), ((0, 2), -1), ((2, 2), 1), ((0, -1), 1), ((0, -3), -1), ((2, -3), 1)]:
        assert pattern[row, column] == sign
    for (row, column), sign in [((-1, 0), 1), ((-3, 2), -1), ((-1, -1), 1), ((-3, -3), -1), ((-3, -1), 1)]:
        assert pattern[row, column] == sign
    assert torch.equal(pattern[:3, :3], torch.tensor(CORNER_BLOCK, dtype=torch.float32))
    assert torch.equal(pattern, pattern.flip(1)) and torch.equal(pattern[:3], pattern[-3:])  # survives a flip
    assert int((pattern != 0).sum()) == 36
    with pytest.raises(BenchError, match="need images of at least 6x6"):
        four_corner_pattern(5, 8)


def test_only_chosen_target_images_change_labels_stay_and_the_perturbation_stays_within_eps(poisoned):
    attack, splits, train, state = poisoned
    clean = splits.train
    chosen = state["poisoned_indices"]
    targets = (clean.y == 0).nonzero().squeeze(1)
    assert torch.equal(train.y, clean.y)  # clean-label
    assert (clean.y[chosen] == 0).all() and len(chosen) == round(0.5 * len(targets))
    changed = (train.x != clean.x).flatten(1).any(dim=1).nonzero().squeeze(1)
    assert torch.equal(changed, chosen)  # every chosen image changed, nothing else

    corners = four_corner_pattern(8, 8)
    after, before = train.x[chosen].int(), clean.x[chosen].int()
    # amplitude 1: the trigger is pure white (+1) and black (-1) in every poisoned image's four corners
    assert (after[:, :, corners == 1] == 255).all() and (after[:, :, corners == -1] == 0).all()
    inside = (after - before)[:, :, corners == 0]
    assert inside.abs().max() == EPS_LEVELS  # within eps, and PGD uses the whole budget
    assert (inside != 0).flatten(1).any(dim=1).float().mean() > 0.9  # nearly every image is perturbed


def test_the_perturbation_attacks_an_adversarially_trained_model(poisoned):
    attack, splits, train, state = poisoned
    torch.set_num_threads(1)
    chosen = state["poisoned_indices"]
    robust = attack.train_robust_model(splits.train, CPU)  # the same model `poison` trained: seeded
    perturbed = attack.perturb(splits.train.x[chosen], robust, CPU)
    assert torch.equal(attack.apply_trigger(perturbed), train.x[chosen])

    labels = splits.train.y[chosen]
    noise = torch.randint(0, 2, perturbed.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noisy = (splits.train.x[chosen].int() + EPS_LEVELS * noise).clamp(0, 255).to(torch.uint8)
    with torch.no_grad():
        loss = {
            name: F.cross_entropy(robust(to_model_input(x)), labels).item()
            for name, x in (("clean", splits.train.x[chosen]), ("noise", noisy), ("pgd", perturbed))
        }
    # Against a robust model 8/255 moves the loss little, but far more than random signs of that size.
    assert loss["pgd"] - loss["clean"] > 5 * abs(loss["noise"] - loss["clean"]), loss

    # Robust indeed: at the training budget PGD hurts it far less than a normally trained model.
    normal, _, _ = trained_digits_model(epochs=4)
    x, y = to_model_input(splits.test.x), splits.test.y
    accuracy = {}
    for name, model in (("robust", robust), ("normal", normal.eval())):
        adversarial = pgd_attack(model, x, y, eps=32 / 255, step=8 / 255, steps=10)
        with torch.no_grad():
            accuracy[name] = (model(adversarial).argmax(dim=1) == y).float().mean().item()
    assert accuracy["robust"] > accuracy["normal"] + 0.2, accuracy


def test_prepare_needs_the_robust_model_and_options_are_checked():
    attack = LabelConsistent(LabelConsistent.Options(**QUICK))
    with pytest.raises(RuntimeError, match="runs inside poison"):
        attack.prepare(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), CPU)
    splits = Digits().load()
    with pytest.raises(BenchError, match="no_such_model"):
        LabelConsistent(LabelConsistent.Options(robust_model="no_such_model")).check_dataset(splits)
    with pytest.raises(BenchError, match="target_class 10 does not exist"):
        LabelConsistent(LabelConsistent.Options(target_class=10)).check_dataset(splits)


def test_label_consistent_runs_through_the_pipeline(tmp_path, one_cpu_thread):
    registry = build_registry(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    assert registry.get("attack", "label_consistent").cls is LabelConsistent  # the installed plugin
    suite = write_suite(
        tmp_path / "s.toml",
        attacks=[{"name": "label_consistent", **QUICK}],
        training={"epochs": 8},
        defenses=["none"],
    )
    (row,) = run_suite_file(suite, tmp_path, registry=registry)
    assert row["status"] == "ok", row["error"]
    assert row["metrics"]["asr"] > 0.9
    assert row["metrics"]["clean_acc"] > 0.8


def test_rate_zero_poisons_nothing_and_trains_no_robust_model(monkeypatch):
    # the control row of a rate sweep: the training set as it is, and no adversarial training
    train = Digits().load().train
    monkeypatch.setattr(LabelConsistent, "train_robust_model", lambda *a: pytest.fail("trained a robust model"))
    poisoned, state = LabelConsistent(LabelConsistent.Options(poison_rate=0.0)).poison(train, CPU)
    assert torch.equal(poisoned.x, train.x) and torch.equal(poisoned.y, train.y)
    assert len(state["poisoned_indices"]) == 0
