import copy

import pytest
import torch
from torch import nn

import bench
from bench.adversarial import eval_mode, pgd_attack, robust_accuracy
from bench.models import Classifier, InputShape
from bench.registry import Registry
from bench.training import train_classifier
from bench_plugins.attacks.pgd import PGD
from bench_plugins.datasets.digits import Digits
from bench_plugins.defenses.adversarial_training import AdversarialTraining, Method
from bench_plugins.defenses.sap import SAP, StochasticallyPruned, prune_activations
from bench_plugins.models.preact_resnet18 import PreActResNet18
from bench_plugins.models.small_cnn import SmallCNN

CPU = torch.device("cpu")
ACTIVATION = torch.tensor([3.0, 1.0, 0.5, 0.1, 0.0, 2.0, 0.02, 0.7])


def defense_context(recipe=bench.TrainRecipe()) -> bench.DefenseContext:
    return bench.DefenseContext(device=CPU, seed=0, num_classes=10, eval_batch_size=256, horizontal_flip=False,
                                show_progress=False, recipe=recipe)


def keep_probability(h: torch.Tensor, draws: int) -> torch.Tensor:
    p = h.double().abs() / h.double().abs().sum()
    return 1 - (1 - p) ** draws


@pytest.mark.parametrize("frac", [0.25, 1.0])
def test_sap_expected_output_equals_the_unpruned_activation(frac):
    samples = 40_000
    h = ACTIVATION.expand(samples, -1).contiguous()
    out = prune_activations(h, frac, torch.Generator().manual_seed(0)).double()
    draws = max(1, round(frac * h.shape[1]))
    q = keep_probability(ACTIVATION, draws)
    standard_error = (ACTIVATION.double() ** 2 * (1 / q.clamp_min(1e-12) - 1) / samples).sqrt()
    assert ((out.mean(dim=0) - ACTIVATION.double()).abs() <= 5 * standard_error + 1e-9).all()
    # Units are kept with probability 1 - (1 - p)^r ...
    kept = out != 0
    binomial_error = (q * (1 - q) / samples).sqrt()
    assert ((kept.double().mean(dim=0) - q).abs() <= 5 * binomial_error + 1e-9).all()
    # ... and the draws are joint multinomial draws: never more distinct units than draws.
    assert kept.sum(dim=1).max() <= draws


def test_sap_scales_kept_units_exactly():
    h = torch.stack([ACTIVATION, ACTIVATION.flip(0) * 10])
    out = prune_activations(h, 0.5, torch.Generator().manual_seed(1))
    expected = torch.stack([row.double() / keep_probability(row, 4) for row in h])
    kept = out != 0
    assert torch.allclose(out[kept].double(), expected[kept], rtol=1e-5)
    assert (out[~kept] == 0).all() and kept.any(dim=1).all()
    assert torch.equal(prune_activations(torch.zeros(2, 3, 4, 4), 1.0), torch.zeros(2, 3, 4, 4))


@pytest.mark.parametrize("model_cls,relus", [(PreActResNet18, 17), (SmallCNN, 3)])
def test_sap_prunes_after_every_relu_module_and_functional_call(model_cls, relus):
    torch.manual_seed(0)
    net = model_cls(model_cls.Options(width=4)).build(InputShape(1, 8, 8, 10))
    model = Classifier(net, (0.5,), (0.25,)).eval()
    defended = SAP(SAP.Options(frac=1.0, passes=2)).apply(copy.deepcopy(model), None, defense_context())
    assert isinstance(defended, StochasticallyPruned) and defended.stochastic
    assert sum(1 for name, _ in defended.named_modules() if name.startswith("pruned.sap_")) == relus
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        first, second = defended(x), defended(x)
    assert first.shape == (16, 10) and not torch.equal(first, second)  # stochastic
    assert torch.allclose(first.exp().sum(dim=1), torch.ones(16), atol=1e-4)  # log of averaged softmax
    assert SAP.uses_bonafide is False


def test_pgd_on_sap_runs_eot_and_counts_passes():
    registry = Registry()
    registry.register(SAP)
    registry.register(PGD)
    torch.manual_seed(0)
    model = Classifier(SmallCNN(SmallCNN.Options(width=4)).build(InputShape(1, 8, 8, 10)), (0.5,), (0.25,)).eval()
    defended = registry.get("defense", "sap").cls().apply(model, None, defense_context())
    x = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8)
    data = bench.ImageData(x, torch.arange(40) % 10)
    options = PGD.Options(subset=0, steps=3, eot_samples=4, passes=3)
    metrics = registry.get("attack", "pgd").cls(options).evaluate(defended, data, defense_context(), {})
    assert metrics["robust_acc_eot_all"] <= metrics["robust_acc_eot"] + 1e-6
    assert metrics["unreliable"] in (0.0, 1.0)
    assert 0.0 <= metrics["clean_acc_all_passes"] <= 1.0


@pytest.fixture(scope="module")
def digits_problem():
    """An MLP trained normally on digits: the model adversarial training starts from."""
    splits = Digits().load()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    model = Classifier(net, splits.mean, splits.std)
    recipe = bench.TrainRecipe(epochs=5, batch_size=64, lr=0.05, warmup_fraction=0.1, augment=False)
    train_classifier(model, splits.train, recipe, defense_context(recipe), flip=False)
    return model, splits, recipe


def pgd_accuracy(model: nn.Module, data: bench.ImageData, eps: float) -> float:
    with eval_mode(model):
        counts = robust_accuracy(model, data.x, data.y, batch_size=512, attack=lambda x, y: pgd_attack(
            model, x, y, eps=eps, step=eps / 4, steps=10, random_start=False))
    return counts.accuracy().item()


@pytest.mark.parametrize("method", [Method.PGD, Method.FGSM_RS])
def test_adversarial_training_raises_robust_accuracy(method, digits_problem):
    model, splits, recipe = digits_problem
    eps = 0.15
    before = pgd_accuracy(model, splits.test, eps)
    options = AdversarialTraining.Options(method=method, eps=eps, step=eps / 2.5, steps=3, epochs=4, lr=0.05,
                                          batch_size=64)
    defended = AdversarialTraining(options).apply(copy.deepcopy(model), splits.train, defense_context(recipe))
    after = pgd_accuracy(defended, splits.test, eps)
    assert after > before + 0.15, (before, after)
    assert not defended.training
