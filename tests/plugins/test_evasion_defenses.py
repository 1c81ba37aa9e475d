import copy

import pytest
import torch
from torch import nn

import bench
from bench.adversarial import eval_mode, pgd_attack, robust_accuracy
from bench.evaluation import CLEAN_ACCURACY_PASSES, clean_accuracy
from bench.models import Classifier, InputShape
from bench.training import train_classifier
from bench_plugins.attacks.pgd import PGD
from bench_plugins.datasets.digits import Digits
from bench_plugins.defenses.adversarial_training import AdversarialTraining, Method
import bench_plugins.defenses.sap
from bench_plugins.defenses.sap import SAP, StochasticallyPruned, prune_activations
from bench_plugins.models.preact_resnet18 import PreActResNet18
from bench_plugins.models.small_cnn import SmallCNN

CPU = torch.device("cpu")
ACTIVATION = torch.tensor([3.0, 1.0, 0.5, 0.1, 0.0, 2.0, 0.02, 0.7])


def defense_context(recipe=bench.TrainRecipe()) -> bench.DefenseContext:
    return bench.DefenseContext(
        device=CPU,
        seed=0,
        num_classes=10,
        eval_batch_size=256,
        horizontal_flip=False,
        show_progress=False,
        recipe=recipe,
    )


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


def test_sap_draws_have_the_joint_law_of_draws_with_replacement():
    """Pairs of units are kept together with probability
    1 - (1 - p_i)^r - (1 - p_j)^r + (1 - p_i - p_j)^r (independent keeps would give the product
    of the marginals, 0.09 more for the two largest units here). A row with long zero runs
    and tiny weights sends draws through the guide table's binary search too."""
    samples, draws = 40_000, 3
    weights = torch.cat([ACTIVATION, torch.zeros(40), torch.full((8,), 1e-3), ACTIVATION[:3]])
    p = weights.double() / weights.double().sum()
    frac = draws / weights.numel()
    kept = prune_activations(weights.expand(samples, -1).contiguous(), frac, torch.Generator().manual_seed(2)) != 0
    for i, j in [(0, 5), (0, 1), (2, 58), (0, 56), (50, 51)]:
        both = 1 - (1 - p[i]) ** draws - (1 - p[j]) ** draws + (1 - p[i] - p[j]) ** draws
        observed = (kept[:, i] & kept[:, j]).double().mean()
        assert abs(observed - both) <= 5 * (both * (1 - both) / samples).sqrt() + 1e-9, (i, j)
    q = 1 - (1 - p) ** draws
    assert ((kept.double().mean(dim=0) - q).abs() <= 5 * (q * (1 - q) / samples).sqrt() + 1e-9).all()
    assert not kept[:, 8:48].any() and kept.sum(dim=1).max() <= draws


def test_sap_draws_from_detached_activations(monkeypatch):
    """The draws carry no gradient: built on activations that require one, their graph was
    never freed (memory grew by the batch's size at every attack step)."""
    seen = []
    draw = bench_plugins.defenses.sap.draw_units
    monkeypatch.setattr(
        bench_plugins.defenses.sap, "draw_units", lambda w, r, g: seen.append(w.requires_grad) or draw(w, r, g)
    )
    h = ACTIVATION.expand(4, -1).clone().requires_grad_()
    prune_activations(h, 1.0, torch.Generator().manual_seed(0)).sum().backward()
    assert seen == [False] and h.grad is not None and h.grad.abs().sum() > 0


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
        counts = robust_accuracy(
            model,
            data.x,
            data.y,
            batch_size=512,
            attack=lambda x, y: pgd_attack(model, x, y, eps=eps, step=eps / 4, steps=10, random_start=False),
        )
    return counts.accuracy().item()


@pytest.mark.parametrize("method", [Method.PGD, Method.FGSM_RS])
def test_adversarial_training_raises_robust_accuracy(method, digits_problem):
    model, splits, recipe = digits_problem
    eps = 0.15
    before = pgd_accuracy(model, splits.test, eps)
    options = AdversarialTraining.Options(
        method=method, eps=eps, step=eps / 2.5, steps=3, epochs=4, lr=0.05, batch_size=64
    )
    defended = AdversarialTraining(options).apply(copy.deepcopy(model), splits.train, defense_context(recipe))
    after = pgd_accuracy(defended, splits.test, eps)
    assert after > before + 0.15, (before, after)
    assert not defended.training


class NoisyLogits(nn.Module):
    """A third-party randomized predictor (no `stochastic` attribute): heavy Gaussian noise on
    the logits, so single passes are often wrong while their average is not. Counts calls."""

    def __init__(self, inner: nn.Module, sigma: float):
        super().__init__()
        self.inner, self.sigma, self.calls = inner, sigma, 0

    def forward(self, x):
        self.calls += 1
        logits = self.inner(x)
        return logits + self.sigma * logits.std() * torch.randn_like(logits) if self.sigma else logits


def test_clean_accuracy_averages_the_passes_of_a_stochastic_model(digits_problem):
    model, splits, _ = digits_problem
    ctx = defense_context()
    test = splits.test.subset(torch.arange(200))  # one evaluation batch
    noisy = NoisyLogits(model, sigma=1.5)
    torch.manual_seed(0)
    averaged = clean_accuracy(noisy, test, ctx)
    assert noisy.calls == 2 + CLEAN_ACCURACY_PASSES  # the randomness probe, then the averaged passes
    single = clean_accuracy(noisy, test, ctx, passes=1)
    assert averaged > single + 0.1, (averaged, single)
    plain = NoisyLogits(model, sigma=0.0)
    assert clean_accuracy(plain, test, ctx) == clean_accuracy(model, test, ctx) and plain.calls == 2 + 1


@pytest.fixture(scope="module")
def sap_and_undefended(digits_problem):
    """The pgd protocol's metrics at eps 0.1 on 100 digits for the trained MLP and SAP on it."""
    model, splits, _ = digits_problem
    test = splits.test.subset(torch.arange(100))
    options = PGD.Options(
        eps=0.1,
        step=0.025,
        steps=10,
        subset=100,
        eot_samples=8,
        passes=4,
        check_subset=20,
        check_restarts=1,
        check_steps_factor=2,
        check_square_queries=50,
    )
    undefended = PGD(options).evaluate(model, test, defense_context(), {})
    defended = SAP().apply(copy.deepcopy(model), None, defense_context())
    return undefended, PGD(options).evaluate(defended, test, defense_context(), {})


def test_sap_under_eot_pgd_is_no_more_robust_than_the_undefended_model(sap_and_undefended):
    undefended, sap = sap_and_undefended
    assert sap["stochastic"] == 1.0 and undefended["stochastic"] == 0.0
    assert undefended["robust_acc_attack"] < undefended["clean_acc_one_pass"] - 0.2  # the budget matters
    assert sap["robust_acc_eot"] <= undefended["robust_acc_attack"] + 0.03
    assert sap["robust_acc"] <= undefended["robust_acc"] + 0.03


def test_eot_is_at_least_as_strong_as_one_sample_gradients_on_sap(sap_and_undefended):
    _, sap = sap_and_undefended
    assert sap["robust_acc_eot"] <= sap["robust_acc_attack"] + 0.02
    # Single SAP passes are noisy: the strict all-passes count is clearly lower than the mean.
    assert sap["robust_acc_eot_all"] < sap["robust_acc_eot"] - 0.05
