import numpy as np
import pytest
import torch
from torch import nn

import bench
from bench.adversarial import Norm, eval_mode, pgd_attack, robust_accuracy
from bench.options import parse_options
from bench.registry import Registry
from bench_plugins.attacks.fgsm import FGSM
from bench_plugins.attacks.pgd import PGD

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


@pytest.mark.parametrize("norm,eps", [(Norm.LINF, 8 / 255), (Norm.L2, 0.5)])
@pytest.mark.parametrize("random_start,restarts", [(True, 1), (False, 1), (True, 3)])
def test_perturbations_stay_within_eps_and_the_unit_box(norm, eps, random_start, restarts):
    model = mlp()
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x[:8] = 0.0  # images on the box boundary, where clamping and projection interact
    x[8:16] = 1.0
    y = torch.arange(64) % 10
    x_adv = pgd_attack(model, x, y, eps=eps, step=eps / 2, steps=5, norm=norm, random_start=random_start,
                       restarts=restarts, generator=torch.Generator().manual_seed(0))
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
        fgsm = robust_accuracy(model, data.x, data.y, **common, attack=lambda x, y: pgd_attack(
            model, x, y, eps=4 / 255, step=4 / 255, steps=1, random_start=False))
        pgd = robust_accuracy(model, data.x, data.y, **common, attack=lambda x, y: pgd_attack(
            model, x, y, eps=4 / 255, step=1 / 255, steps=20, random_start=False))
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
    attack = PGD(PGD.Options(targeted=True, eps=0.5, step=0.1, steps=10, subset=0, check_subset=50,
                                check_steps_factor=2))
    metrics = attack.evaluate(model, data, context(), {})
    assert metrics["asr"] > 0.9 and metrics["robust_acc"] < 0.1


def test_masking_flag_triggers_on_a_gradient_shattered_model():
    inner = linear_model(classes=2)
    data = self_labelled_data(inner, count=400)
    options = PGD.Options(eps=8 / 255, step=2 / 255, steps=10, subset=0, eot_samples=10, passes=2)
    metrics = PGD(options).evaluate(GradientShattered(inner, scale=3.0), data, context(2), {})
    assert metrics["robust_acc"] - metrics["robust_acc_eot"] > 0.1
    assert metrics["unreliable"] == 1.0
    assert metrics["clean_acc_all_passes"] == 1.0


def test_masking_flag_stays_off_for_a_plain_model():
    inner = linear_model(classes=2)
    data = self_labelled_data(inner, count=400)
    options = PGD.Options(eps=8 / 255, step=2 / 255, steps=10, subset=0, check_subset=200)
    metrics = PGD(options).evaluate(inner, data, context(2), {})
    assert metrics["unreliable"] == 0.0
    assert 0.0 <= metrics["masking_gap"] <= 0.05
    assert metrics["robust_acc_eot"] == metrics["robust_acc"]  # deterministic: EOT changes nothing
    assert 0.0 < metrics["robust_acc"] < 1.0


def test_fgsm_plugin_reports_every_metric_through_the_registry():
    registry = Registry()
    registry.register(PGD)
    registry.register(FGSM)
    fgsm_cls = registry.get("attack", "fgsm").cls
    options = parse_options(fgsm_cls.Options, {"norm": "l2", "eps": 0.5, "subset": 100}, "test")
    model = mlp()
    metrics = fgsm_cls(options).evaluate(model, self_labelled_data(model), context(), {})
    assert set(metrics) == {m.key for m in fgsm_cls.metrics}
    assert all(0.0 <= metrics[k] <= 1.0 for k in metrics if k != "masking_gap")
    assert metrics["asr"] == pytest.approx(1 - metrics["robust_acc"], abs=1e-6)  # all clean-correct
    assert registry.get("attack", "pgd").cls.success_metric == "asr"


def test_native_pgd_agrees_with_art():
    from art.attacks.evasion import ProjectedGradientDescentPyTorch
    from art.estimators.classification import PyTorchClassifier

    model = mlp(seed=3)
    data = self_labelled_data(model, count=400, seed=3)
    eps, step, steps = 6 / 255, 1 / 255, 10
    with eval_mode(model):
        native = robust_accuracy(model, data.x, data.y, batch_size=128, attack=lambda x, y: pgd_attack(
            model, x, y, eps=eps, step=step, steps=steps, random_start=False)).accuracy().item()
    classifier = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=(1, 8, 8),
                                   nb_classes=10, clip_values=(0.0, 1.0), device_type="cpu")
    art_pgd = ProjectedGradientDescentPyTorch(classifier, norm=np.inf, eps=eps, eps_step=step, max_iter=steps,
                                              num_random_init=0, batch_size=128, verbose=False)
    x = data.x.float().numpy() / 255
    x_adv = art_pgd.generate(x, y=data.y.numpy())
    art = float((classifier.predict(x_adv).argmax(axis=1) == data.y.numpy()).mean())
    assert 0.05 < native < 0.95  # a budget where the comparison means something
    assert abs(native - art) <= 0.01, (native, art)


def test_a_target_class_the_dataset_lacks_fails_before_the_run():
    splits = bench.DatasetSplits(self_labelled_data(linear_model()), self_labelled_data(linear_model()), 10,
                                 (0.5,), (0.25,), "random")
    PGD(PGD.Options(targeted=True, target_class=9)).check_dataset(splits)
    with pytest.raises(bench.BenchError, match="target_class 10"):
        FGSM(FGSM.Options(targeted=True, target_class=10)).check_dataset(splits)
