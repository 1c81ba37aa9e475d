import pytest
import torch

import bench
from bench.models import Classifier
from bench.options import parse_options
from bench_plugins.models.resnet20 import ResNet20
from bench_plugins.models.vgg16_bn import Vgg16Bn


def parameter_count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("model_cls", [ResNet20, Vgg16Bn])
@pytest.mark.parametrize("channels, side, classes", [(3, 32, 10), (1, 28, 10), (3, 32, 43)])
def test_models_give_one_logit_per_class(model_cls, channels, side, classes):
    options = parse_options(model_cls.Options, {"width": 8}, "test")
    net = model_cls(options).build(bench.InputShape(channels, side, side, classes))
    model = Classifier(net, (0.5,) * channels, (0.25,) * channels).eval()
    assert model(torch.rand(3, channels, side, side)).shape == (3, classes)


def test_resnet20_has_the_papers_parameter_count():
    # He et al. 2016, table 6: 0.27M parameters (parameter-free shortcuts).
    net = ResNet20().build(bench.InputShape(3, 32, 32, 10))
    assert 0.26e6 < parameter_count(net) < 0.28e6
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == 19  # + 1 linear = 20 layers


def test_vgg16_bn_has_thirteen_batch_normalized_convolutions_and_a_linear_head():
    net = Vgg16Bn().build(bench.InputShape(3, 32, 32, 10))
    assert 14.6e6 < parameter_count(net) < 14.8e6
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == 13
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 13
    assert sum(isinstance(m, torch.nn.Linear) for m in net.modules()) == 1


def test_resnet20_fits_a_small_batch_with_every_parameter_in_use(one_cpu_thread):
    torch.manual_seed(0)
    net = ResNet20(ResNet20.Options(width=4)).build(bench.InputShape(3, 16, 16, 10))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]  # it memorizes 8 images with 8 labels


def test_recipes_are_the_documented_fast_cifar_schedules():
    common = dict(
        batch_size=512,
        lr=0.2,
        momentum=0.9,
        weight_decay=5e-4,
        warmup_fraction=0.15,
        label_smoothing=0.0,
        augment=True,
        crop_padding=4,
    )
    assert ResNet20.recipe == bench.TrainRecipe(epochs=40, **common)
    assert Vgg16Bn.recipe == bench.TrainRecipe(epochs=30, **common)
