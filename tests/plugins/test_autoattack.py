"""AutoAttack through torchattacks: at least as strong as PGD, and it says what ran."""

import copy

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
        model, subset, CTX, {}
    )
    pgd = PGD(PGD.Options(eps=0.1, step=0.025, subset=12, check_restarts=1, check_square_queries=100)).evaluate(
        model, subset, CTX, {}
    )
    assert aa["robust_acc"] <= pgd["robust_acc_attack"] + 1 / 12  # PGD's own number, not pgd's worst case
    assert aa["robust_acc"] < 0.9  # eps 0.1 on 8x8 digits breaks many images
    assert aa["asr"] == pytest.approx(1 - aa["robust_acc"], abs=1e-6)  # all 12 images are clean-correct


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
    assert members["Square"].rescale_schedule is False  # RobustBench runs Square with resc_schedule=False
    few_classes, _ = AutoAttack().build(model, num_classes=4, seed=0)
    assert all(m.n_target_classes == 3 for m in few_classes._autoattack.attacks if hasattr(m, "n_target_classes"))


def test_channels_last_models_and_inputs_work(digits_model):
    # the CUDA path keeps models and inputs in channels_last; FAB reshapes with .view()
    model, test = digits_model
    images = test.subset(torch.arange(6))
    small = AutoAttack(AutoAttack.Options(eps=0.1, subset=6, iterations=3, square_queries=5))
    contiguous = small.evaluate(model, images, CTX, {})
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert small.evaluate(channels_last, images, CTX, {}) == pytest.approx(contiguous, abs=1e-6)


def test_protocol_names_the_attacks_that_ran_and_any_cut_budget():
    text = AutoAttack(AutoAttack.Options(version=Version.STANDARD)).describe_protocol()
    assert "APGD-CE, APGD-T, FAB-T, Square" in text and "torchattacks" in text and "first 1000" in text
    assert "100 iterations" in text and "NOT the standard" not in text
    cut = AutoAttack(AutoAttack.Options(iterations=10, square_queries=10)).describe_protocol()
    assert "NOT the standard budget: 10 iterations instead of 100, Square cut to 10 queries" in cut


class NoisyLogits(torch.nn.Module):
    """A third-party randomized defense: noise on the logits, no `stochastic` attribute."""

    def __init__(self, inner: torch.nn.Module, sigma: float):
        super().__init__()
        self.inner, self.sigma = inner, sigma

    def forward(self, x):
        logits = self.inner(x)
        return logits + self.sigma * logits.std() * torch.randn_like(logits)


def test_stochastic_models_get_the_rand_version(digits_model):
    model, test = digits_model
    sample = test.x[:16].float() / 255
    sap = SAP().apply(model, None, DefenseContext(device=torch.device("cpu"), seed=0, num_classes=10))
    assert AutoAttack()._version(sap, sample) == "rand"  # declared
    noisy = NoisyLogits(model, sigma=0.5)
    assert not hasattr(noisy, "stochastic") and AutoAttack()._version(noisy, sample) == "rand"  # detected
    assert AutoAttack()._version(model, sample) == "standard"
    assert AutoAttack(AutoAttack.Options(version=Version.STANDARD))._version(noisy, sample) == "standard"


def test_stochastic_models_are_counted_over_repeated_passes(digits_model):
    model, test = digits_model
    noisy = NoisyLogits(model, sigma=1.0)
    torch.manual_seed(0)
    options = AutoAttack.Options(eps=0.1, subset=12, iterations=2, passes=7)
    attack = AutoAttack(options)
    metrics = attack.evaluate(noisy, test.subset(torch.arange(12)), CTX, {})
    assert metrics["rand_version"] == 1.0 and "predicted 7 times per image" in attack.describe_protocol()
    # the protocol line is the same whatever ran before (a cached evaluation cannot change it)
    assert AutoAttack(options).describe_protocol() == attack.describe_protocol()
    correct_predictions = metrics["robust_acc"] * 12 * 7
    # A mean over 7 passes per image: a whole number of correct predictions out of 84, not of 12.
    assert correct_predictions == pytest.approx(round(correct_predictions), abs=1e-4)
    assert metrics["robust_acc"] * 12 != pytest.approx(round(metrics["robust_acc"] * 12), abs=1e-4)


def test_a_torchattacks_version_outside_the_bound_stops_the_attack(digits_model, monkeypatch):
    import torchattacks

    from bench import BenchError

    model, _ = digits_model
    monkeypatch.setattr(torchattacks, "__version__", "3.4.0")
    with pytest.raises(BenchError, match="needs torchattacks>=3.5,<3.6, but torchattacks 3.4.0 is installed"):
        AutoAttack().build(model, num_classes=10, seed=0)
    monkeypatch.setattr(torchattacks, "__version__", "3.5.9")
    AutoAttack().build(model, num_classes=10, seed=0)


def test_a_missing_torchattacks_is_reported_before_the_suite_runs(tmp_path, monkeypatch):
    import sys

    from click.testing import CliRunner

    from bench.cli import main
    from bench_plugins.testing import write_suite

    monkeypatch.setitem(sys.modules, "torchattacks", None)  # import torchattacks now raises ImportError
    suite = write_suite(tmp_path / "s.toml", attacks=[{"name": "autoattack", "subset": 10}], store=tmp_path / "r.db")
    result = CliRunner().invoke(main, ["run", str(suite), "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 2, result.output
    assert "pip install 'robustness-bench[autoattack]'" in result.output
    assert not (tmp_path / "r.db").exists()
