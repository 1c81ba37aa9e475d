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
    logits = model(torch.rand(3, channels, side, side))
    assert logits.shape == (3, classes) and torch.isfinite(logits).all()


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


def test_resnet20_trains_a_step_and_its_recipe_is_a_fast_cifar_schedule():
    net = ResNet20(ResNet20.Options(width=4)).build(bench.InputShape(3, 32, 32, 10))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    optimizer.step()
    assert all(p.grad is not None for p in net.parameters())
    for model_cls in (ResNet20, Vgg16Bn):
        recipe = model_cls.recipe
        assert recipe.batch_size == 512 and recipe.augment and 30 <= recipe.epochs <= 40
