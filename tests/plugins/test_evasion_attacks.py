import sys

import numpy as np
import pytest
import torch
from torch import nn

import bench
from bench.adversarial import Norm, PassCounts, dlr_loss, eval_mode, pgd_attack, robust_accuracy, worst_case
from bench.evaluation import is_stochastic
from bench.models import Classifier
from bench.options import parse_options
from bench.registry import Registry
from bench.training import train_classifier
from bench_plugins.attacks.fgsm import FGSM
from bench_plugins.attacks.pgd import PGD
from bench_plugins.datasets.digits import Digits

CPU = torch.device("cpu")


def context(num_classes: int = 10) -> bench.RunContext:
    return bench.RunContext(device=CPU, seed=0, num_classes=num_classes, eval_batch_size=256, show_progress=False)


def linear_model(classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, classes)).eval()


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


def self_labelled_data(model: nn.Module, count: int = 300, seed: int = 0) -> bench.ImageData:
    """Random 8x8 images labelled by the model itself (clean accuracy 100%)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (count, 1, 8, 8), dtype=torch.uint8, generator=gen)
    with torch.no_grad():
        y = model(x.float() / 255).argmax(dim=1)
    return bench.ImageData(x, y)


class ShatterGradient(torch.autograd.Function):
    """Identity forward; backward multiplies each gradient entry by (1 + scale * N(0, 1)): the
    expected gradient is the true one, but one sample is mostly noise."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * (1 + ctx.scale * torch.randn_like(grad)), None


class GradientShattered(nn.Module):
    """A deliberately gradient-masked toy: a linear model behind a stochastic
    gradient-shattering layer. Its predictions are deterministic, its gradients are not."""

    stochastic = True

    def __init__(self, inner: nn.Module, scale: float):
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, x):
        return self.inner(ShatterGradient.apply(x, self.scale))


class ForwardCounter(nn.Module):
    stochastic = True

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


class ScaledLogits(nn.Module):
    """Gradient masking by saturation: the same decisions, logits times `scale`, so the softmax
    saturates and cross-entropy gradients underflow to zero."""

    def __init__(self, inner: nn.Module, scale: float):
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, x):
        return self.inner(x) * self.scale


class Quantized(nn.Module):
    """Gradient masking by a zero-gradient input quantizer: x -> round(x * levels) / levels,
    detached, so no gradient reaches the input at all."""

    def __init__(self, inner: nn.Module, levels: int):
        super().__init__()
        self.inner, self.levels = inner, levels

    def forward(self, x):
        return self.inner((torch.round(x * self.levels) / self.levels).detach())


class NoisyInput(nn.Module):
    """A third-party randomized defense: Gaussian noise on the input in every forward pass, and
    no `stochastic` attribute."""

    def __init__(self, inner: nn.Module, sigma: float):
        super().__init__()
        self.inner, self.sigma = inner, sigma

    def forward(self, x):
        return self.inner(x + self.sigma * torch.randn_like(x))


@pytest.fixture(scope="module")
def digits_mlp():
    """A small MLP trained briefly on digits, and the first 100 test images."""
    splits = Digits().load()
    torch.manual_seed(0)
    model = Classifier(
        nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), splits.mean, splits.std
    )
    recipe = bench.TrainRecipe(epochs=5, batch_size=64, lr=0.05, augment=False)
    train_classifier(model, splits.train, recipe, context(), flip=False)
    return model.eval(), splits.test.subset(torch.arange(100))


# eps 0.1 on digits (17 grey levels): the undefended MLP keeps about 60%; checks on every image.
CHECKED = dict(
    eps=0.1,
    step=0.025,
    steps=10,
    subset=100,
    check_subset=100,
    check_restarts=1,
    check_steps_factor=2,
    check_square_queries=300,
)


@pytest.mark.parametrize("norm,eps", [(Norm.LINF, 8 / 255), (Norm.L2, 0.5)])
@pytest.mark.parametrize("random_start,restarts", [(True, 1), (False, 1), (True, 3)])
def test_perturbations_stay_within_eps_and_the_unit_box(norm, eps, random_start, restarts):
    model = mlp()
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x[:8] = 0.0  # images on the box boundary, where clamping and projection interact
    x[8:16] = 1.0
    y = torch.arange(64) % 10
    x_adv = pgd_attack(
        model,
        x,
        y,
        eps=eps,
        step=eps / 2,
        steps=5,
        norm=norm,
        random_start=random_start,
        restarts=restarts,
        generator=torch.Generator().manual_seed(0),
    )
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(dim=1) if norm is Norm.LINF else delta.norm(dim=1)
    assert (size <= eps + 1e-5).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (size > eps / 4).float().mean() > 0.5  # the attack actually moved


def test_more_pgd_steps_never_do_worse_than_fgsm():
    model = mlp()
    data = self_labelled_data(model)
    common = dict(batch_size=128, passes=1)
    with eval_mode(model):
        fgsm = robust_accuracy(
            model,
            data.x,
            data.y,
            **common,
            attack=lambda x, y: pgd_attack(model, x, y, eps=4 / 255, step=4 / 255, steps=1, random_start=False),
        )
        pgd = robust_accuracy(
            model,
            data.x,
            data.y,
            **common,
            attack=lambda x, y: pgd_attack(model, x, y, eps=4 / 255, step=1 / 255, steps=20, random_start=False),
        )
    assert pgd.accuracy().item() <= fgsm.accuracy().item() + 0.01
    assert fgsm.accuracy().item() < 1.0  # the budget is large enough to matter


def test_eot_averages_exactly_k_samples_per_step():
    model = ForwardCounter(mlp())
    x, y = torch.rand(4, 1, 8, 8), torch.arange(4)
    pgd_attack(model, x, y, eps=0.1, step=0.02, steps=3, eot_samples=7, random_start=False)
    assert model.calls == 3 * 7
    model.calls = 0
    pgd_attack(model, x, y, eps=0.1, step=0.02, steps=3, eot_samples=7, restarts=2)
    assert model.calls == 2 * (3 * 7 + 1)  # plus one prediction per restart to keep the best


def test_targeted_pgd_reaches_the_next_class():
    model = linear_model()
    data = self_labelled_data(model, count=200)
    attack = PGD(
        PGD.Options(
            targeted=True,
            eps=0.5,
            step=0.1,
            steps=10,
            subset=0,
            check_subset=50,
            check_steps_factor=2,
            check_restarts=1,
            check_square_queries=100,
        )
    )
    metrics = attack.evaluate(model, data, context(), {})
    assert metrics["asr"] > 0.9 and metrics["robust_acc"] < 0.1


def test_eot_beats_one_sample_gradients_on_a_gradient_shattered_model():
    inner = linear_model(classes=2)
    data = self_labelled_data(inner, count=400)
    options = PGD.Options(
        eps=8 / 255,
        step=2 / 255,
        steps=10,
        subset=0,
        eot_samples=10,
        passes=2,
        check_subset=50,
        check_steps_factor=1,
        check_restarts=1,
        check_square_queries=100,
    )
    metrics = PGD(options).evaluate(GradientShattered(inner, scale=3.0), data, context(2), {})
    assert metrics["stochastic"] == 1.0  # declared
    assert metrics["robust_acc_attack"] - metrics["robust_acc_eot"] > 0.1
    assert metrics["robust_acc"] <= metrics["robust_acc_eot"]
    assert metrics["clean_acc_all_passes"] == 1.0  # its predictions are deterministic


def test_dlr_is_scale_invariant_where_cross_entropy_saturates():
    torch.manual_seed(0)
    logits = torch.randn(8, 10, requires_grad=True)
    labels = logits.detach().argmax(dim=1)  # correctly classified: cross-entropy saturates when scaled
    for targeted in (False, True):
        assert torch.allclose(dlr_loss(logits * 1e4, labels, targeted), dlr_loss(logits, labels, targeted), atol=1e-4)
    ce_grad = torch.autograd.grad(torch.nn.functional.cross_entropy(logits * 1e4, labels), logits)[0]
    dlr_grad = torch.autograd.grad(dlr_loss(logits * 1e4, labels, False).sum(), logits)[0]
    assert (ce_grad == 0).all() and (dlr_grad != 0).any(dim=1).all()
    # Untargeted DLR is positive exactly when the prediction is wrong.
    other = (labels + 1) % 10
    wrong = logits.detach().clone()
    wrong[torch.arange(8), other] = wrong.max(dim=1).values + 1
    assert (dlr_loss(wrong, labels, False) > 0).all() and (dlr_loss(logits.detach(), labels, False) < 0).all()


def test_the_undefended_model_is_not_flagged(digits_mlp):
    model, data = digits_mlp
    metrics = PGD(PGD.Options(**CHECKED)).evaluate(model, data, context(), {})
    assert metrics["unreliable"] == 0.0 and metrics["masking_gap"] <= 0.05
    assert metrics["robust_acc_attack"] < metrics["clean_acc_one_pass"] - 0.2  # the budget matters
    assert metrics["stochastic"] == 0.0


def test_scaled_logits_are_flagged_and_the_worst_case_sees_through_them(digits_mlp):
    model, data = digits_mlp
    honest = PGD(PGD.Options(**CHECKED)).evaluate(model, data, context(), {})
    masked = PGD(PGD.Options(**CHECKED)).evaluate(ScaledLogits(model, 1e4), data, context(), {})
    assert masked["clean_acc_one_pass"] == honest["clean_acc_one_pass"]  # the same decisions
    assert masked["robust_acc_attack"] > honest["robust_acc_attack"] + 0.2  # cross-entropy PGD is fooled
    assert masked["robust_acc_check_ce"] > honest["robust_acc_attack"] + 0.2  # more CE steps do not help
    assert masked["robust_acc_check_dlr"] <= honest["robust_acc_attack"] + 0.05  # DLR is scale-invariant
    assert masked["unreliable"] == 1.0
    assert masked["robust_acc"] <= honest["robust_acc"] + 0.05


def test_a_zero_gradient_quantizer_is_flagged_through_square(digits_mlp):
    model, data = digits_mlp
    masked = PGD(PGD.Options(**CHECKED)).evaluate(Quantized(model, 16), data, context(), {})
    # No gradient reaches the input: every PGD, cross-entropy or DLR, is a random start only.
    assert min(masked["robust_acc_check_ce"], masked["robust_acc_check_dlr"]) > masked["clean_acc_one_pass"] - 0.05
    assert masked["robust_acc_check_square"] < masked["robust_acc_attack"] - 0.1
    assert masked["unreliable"] == 1.0


@pytest.mark.parametrize(
    "wrapper",
    [lambda m: m, lambda m: ScaledLogits(m, 1e4), lambda m: Quantized(m, 16)],
    ids=["plain", "scaled", "quantized"],
)
def test_the_headline_is_the_worst_case_over_every_attack(wrapper, digits_mlp):
    model, data = digits_mlp
    metrics = PGD(PGD.Options(**CHECKED)).evaluate(wrapper(model), data, context(), {})
    per_attack = [
        "robust_acc_attack",
        "robust_acc_eot",
        "robust_acc_check_ce",
        "robust_acc_check_dlr",
        "robust_acc_check_square",
    ]
    assert all(metrics["robust_acc"] <= metrics[key] + 1e-9 for key in per_attack), metrics
    # Deterministic model: ASR is the share of clean-correct images the worst case fools.
    clean = metrics["clean_acc_one_pass"]
    assert metrics["asr"] == pytest.approx((clean - metrics["robust_acc"]) / clean, abs=0.011)


def test_the_worst_case_is_taken_per_image_over_the_attacks_each_image_saw():
    def counts(correct, passes=2):
        return PassCounts(torch.tensor(correct), torch.zeros(len(correct), dtype=torch.long), passes)

    attack = counts([2, 2, 1, 2, 2])  # every image
    check_a = counts([0, 2, 2])  # the first three images only
    check_b = counts([2, 1, 0, 2, 2])  # every image
    worst = worst_case([attack, check_a, check_b])
    assert worst.correct.tolist() == [0, 1, 0, 2, 2]
    # Lower than every single attack's accuracy: they fool different images.
    assert worst.accuracy().item() == pytest.approx(0.5)
    assert worst.accuracy().item() < min(run.accuracy().item() for run in (attack, check_a, check_b))


def test_stochastic_models_are_detected_by_their_forward_passes(digits_mlp):
    model, data = digits_mlp
    sample = data.x[:16].float() / 255
    noisy = NoisyInput(model, sigma=0.05)
    assert not hasattr(noisy, "stochastic") and is_stochastic(noisy, sample)
    assert not is_stochastic(model, sample)
    dropout = nn.Sequential(model, nn.Dropout(0.5)).train()
    assert not is_stochastic(dropout, sample) and dropout.training  # judged in eval mode, mode restored
    options = PGD.Options(**{**CHECKED, "subset": 30, "check_subset": 10, "eot_samples": 2, "passes": 3})
    assert PGD(options).evaluate(noisy, data, context(), {})["stochastic"] == 1.0


def test_without_torchattacks_the_protocol_says_square_did_not_run(digits_mlp, monkeypatch):
    model, data = digits_mlp
    options = PGD.Options(**{**CHECKED, "subset": 20, "check_subset": 10})
    assert "Square with 300 queries (torchattacks 3.5" in PGD(options).describe_protocol()
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # import torchattacks now raises ImportError
    metrics = PGD(options).evaluate(model, data, context(), {})
    assert "robust_acc_check_square" not in metrics and "robust_acc_check_dlr" in metrics
    assert "NO Square check: torchattacks is not installed" in PGD(options).describe_protocol()
    off = PGD.Options(**{**CHECKED, "check_square_queries": 0})
    assert "NO Square check: turned off" in PGD(off).describe_protocol()


def test_a_torchattacks_version_outside_the_bound_skips_square_visibly(monkeypatch):
    import torchattacks

    monkeypatch.setattr(torchattacks, "__version__", "3.6.0")
    assert (
        "NO Square check: torchattacks 3.6.0 is installed, outside the supported torchattacks>=3.5,<3.6"
        in PGD().describe_protocol()
    )


def test_targeted_checks_count_target_hits():
    model = linear_model()
    data = self_labelled_data(model, count=100)
    options = PGD.Options(
        targeted=True,
        eps=0.3,
        step=0.1,
        steps=1,
        random_start=False,
        subset=0,
        check_subset=100,
        check_steps_factor=5,
        check_square_queries=50,
    )
    metrics = PGD(options).evaluate(model, data, context(), {})
    # One short step rarely leaves the true class; the 5-step checks reach the target, the gap
    # (in target hits) says by how much, and the worst case counts their hits.
    assert metrics["robust_acc_attack"] > 0.8 and metrics["robust_acc_check_ce"] < 0.1
    assert metrics["masking_gap"] > 0.5 and metrics["unreliable"] == 1.0
    assert metrics["asr"] > 0.9


def test_fgsm_plugin_reports_every_metric_through_the_registry():
    registry = Registry()
    registry.register(PGD)
    registry.register(FGSM)
    fgsm_cls = registry.get("attack", "fgsm").cls
    options = parse_options(
        fgsm_cls.Options,
        {"norm": "l2", "eps": 0.5, "subset": 100, "check_subset": 100, "check_square_queries": 100},
        "test",
    )
    model = mlp()
    metrics = fgsm_cls(options).evaluate(model, self_labelled_data(model), context(), {})
    assert set(metrics) == {m.key for m in fgsm_cls.metrics}
    assert metrics["asr"] == pytest.approx(1 - metrics["robust_acc"], abs=1e-6)  # all clean-correct
    assert metrics["robust_acc"] <= metrics["robust_acc_attack"]
    assert registry.get("attack", "pgd").cls.success_metric == "asr"
    headline = {m.key for m in fgsm_cls.metrics if not m.diagnostic}
    assert headline == {"robust_acc", "asr", "unreliable"}


def test_native_pgd_agrees_with_art():
    from art.attacks.evasion import ProjectedGradientDescentPyTorch
    from art.estimators.classification import PyTorchClassifier

    model = mlp(seed=3)
    data = self_labelled_data(model, count=400, seed=3)
    eps, step, steps = 6 / 255, 1 / 255, 10
    with eval_mode(model):
        native = (
            robust_accuracy(
                model,
                data.x,
                data.y,
                batch_size=128,
                attack=lambda x, y: pgd_attack(model, x, y, eps=eps, step=step, steps=steps, random_start=False),
            )
            .accuracy()
            .item()
        )
    classifier = PyTorchClassifier(
        model=model,
        loss=nn.CrossEntropyLoss(),
        input_shape=(1, 8, 8),
        nb_classes=10,
        clip_values=(0.0, 1.0),
        device_type="cpu",
    )
    art_pgd = ProjectedGradientDescentPyTorch(
        classifier,
        norm=np.inf,
        eps=eps,
        eps_step=step,
        max_iter=steps,
        num_random_init=0,
        batch_size=128,
        verbose=False,
    )
    x = data.x.float().numpy() / 255
    x_adv = art_pgd.generate(x, y=data.y.numpy())
    art = float((classifier.predict(x_adv).argmax(axis=1) == data.y.numpy()).mean())
    assert 0.05 < native < 0.95  # a budget where the comparison means something
    assert abs(native - art) <= 0.01, (native, art)


def test_a_target_class_the_dataset_lacks_fails_before_the_run():
    splits = bench.DatasetSplits(
        self_labelled_data(linear_model()), self_labelled_data(linear_model()), 10, (0.5,), (0.25,), "random"
    )
    PGD(PGD.Options(targeted=True, target_class=9)).check_dataset(splits)
    with pytest.raises(bench.BenchError, match="target_class 10"):
        FGSM(FGSM.Options(targeted=True, target_class=10)).check_dataset(splits)


def test_the_headline_is_measured_on_the_images_every_attack_saw(digits_mlp):
    # A masking defense fools the configured attack on every image; only the checked images see
    # the checks. Mixing the unchecked images into the headline would rank it as robust.
    model, data = digits_mlp
    options = PGD.Options(**{**CHECKED, "subset": 100, "check_subset": 25})
    masked = PGD(options).evaluate(ScaledLogits(model, 1e4), data, context(), {})
    honest = PGD(options).evaluate(model, data, context(), {})
    assert masked["headline_images"] == 25 and masked["unreliable"] == 1.0
    assert masked["robust_acc"] <= masked["robust_acc_check_dlr"] + 1e-9  # DLR ran on the same 25 images
    assert masked["robust_acc_attack"] > masked["robust_acc"] + 0.2
    assert masked["robust_acc"] <= honest["robust_acc"] + 0.08
