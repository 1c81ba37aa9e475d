"""The `fine_pruning` defense: where it prunes, that the reported channels are exactly the zeroed
ones (and stay zero through fine-tuning), the stopping rule, and that it sees only bonafide data."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import bench
from bench.errors import BenchError
from bench.evaluation import clean_accuracy, to_model_input
from bench.models import Classifier
from bench.training import train_classifier
from bench_plugins.datasets.digits import Digits
from bench_plugins.defenses import fine_pruning
from bench_plugins.defenses.fine_pruning import ChannelMask, FinePruning, find_prune_point, mean_channel_activation
from bench_plugins.models.preact_resnet18 import PreActResNet18
from bench_plugins.models.small_cnn import SmallCNN

CPU = torch.device("cpu")
SHAPE = bench.InputShape(1, 8, 8, 10)


def context(**kwargs) -> bench.DefenseContext:
    return bench.DefenseContext(**{"device": CPU, "seed": 0, "num_classes": 10, "recipe": SmallCNN.recipe, **kwargs})


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Classifier(SmallCNN(SmallCNN.Options(width=4)).build(SHAPE), (0.5,), (0.25,)).eval()


@pytest.fixture(scope="module")
def digits():
    return Digits().load()


@pytest.fixture(scope="module")
def trained(digits):
    model = tiny_model()
    ctx = bench.RunContext(device=CPU, seed=0, num_classes=10)
    train_classifier(model, digits.train, dataclasses.replace(SmallCNN.recipe, epochs=3), ctx, flip=False)
    return model


def outputs_of(module: nn.Module, model: nn.Module, x_uint8: torch.Tensor) -> torch.Tensor:
    captured = []
    hook = module.register_forward_hook(lambda m, args, out: captured.append(out.detach().clone()))
    with torch.no_grad():
        model.eval()(to_model_input(x_uint8))
    hook.remove()
    return captured[0]


def test_prune_point_is_after_the_last_conv_and_its_activation():
    sample = torch.rand(2, 1, 8, 8)
    small = tiny_model()
    # conv, BN, ReLU, AdaptiveAvgPool2d: the pooled post-ReLU channels
    assert find_prune_point(small, sample) == ("net.10", "net.7")
    preact = Classifier(PreActResNet18(PreActResNet18.Options(width=2)).build(SHAPE), (0.5,), (0.25,))
    # residual sum, then the head's BN (a functional ReLU, pooling and the linear layer follow)
    assert find_prune_point(preact, sample) == ("net.bn", "net.layers.7.conv2")
    assert find_prune_point(small, sample, "net.8") == ("net.8", "net.7")
    with pytest.raises(BenchError, match="no module 'net.99'"):
        find_prune_point(small, sample, "net.99")


def test_a_module_called_twice_is_never_the_prune_point():
    relu = nn.ReLU()
    net = Classifier(
        nn.Sequential(nn.Conv2d(1, 4, 3), relu, nn.Conv2d(4, 4, 3), relu, nn.Flatten(), nn.Linear(64, 10)),
        (0.5,),
        (0.25,),
    )
    assert find_prune_point(net, torch.rand(2, 1, 8, 8)) == ("net.2", "net.2")


def test_prunes_exactly_the_reported_channels_and_they_stay_zero_after_fine_tuning(digits, trained):
    bonafide = digits.test.subset(torch.arange(200))
    activation = mean_channel_activation(trained, trained.get_submodule("net.10"), bonafide, context())
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    options = FinePruning.Options(
        max_accuracy_drop=1.0, max_prune_ratio=0.5, epochs=2, augment=False, samples_per_epoch=0
    )
    result = FinePruning(options).apply(copy.deepcopy(trained), bonafide, context())
    defended = result.model

    pruned = [row["index"] for row in result.series["pruned_channels"]]
    assert len(pruned) == 8 and result.values == {"pruned_channels": 8}  # half of 16 channels
    assert sorted(pruned) == sorted(activation.argsort()[:8].tolist())  # the least active ones
    masked = defended.get_submodule("net.10")
    assert isinstance(masked, ChannelMask)
    assert any(not torch.equal(before[k], v) for k, v in defended.state_dict().items() if k in before)  # fine-tuned

    out = outputs_of(masked, defended, digits.test.x[200:400])
    kept = [c for c in range(16) if c not in pruned]
    assert (out[:, pruned] == 0).all()
    assert all(out[:, c].abs().sum() > 0 for c in kept if activation[c] > 0)
    # still zero when training (batch statistics, gradients flowing)
    defended.train()
    out = masked(defended.net[:10](((to_model_input(digits.test.x[:64]) - 0.5) / 0.25)))
    assert (out[:, pruned] == 0).all()


def test_stops_before_the_accuracy_drop_exceeds_the_limit(digits, trained):
    bonafide = digits.test.subset(torch.arange(200))
    baseline = clean_accuracy(trained, bonafide, context())
    options = FinePruning.Options(max_accuracy_drop=0.05, epochs=0)
    result = FinePruning(options).apply(copy.deepcopy(trained), bonafide, context())
    steps = result.series["prune_steps"]
    pruned = result.values["pruned_channels"]
    assert steps[0] == {"pruned": 0, "bonafide_acc": pytest.approx(baseline)}
    accepted = [s for s in steps if s["pruned"] <= pruned]
    assert all((baseline - s["bonafide_acc"]) / baseline <= 0.05 for s in accepted)
    if pruned < 16:  # stopped by the rule: the next step broke it
        assert (baseline - steps[-1]["bonafide_acc"]) / baseline > 0.05
    assert clean_accuracy(result.model, bonafide, context()) == pytest.approx(accepted[-1]["bonafide_acc"])


def test_fine_pruning_only_ever_sees_bonafide_images(trained):
    bonafide = bench.ImageData(torch.randint(100, 150, (48, 1, 8, 8), dtype=torch.uint8), torch.randint(0, 10, (48,)))
    allowed = {row.numpy().tobytes() for row in to_model_input(bonafide.x)}
    seen = []
    model = copy.deepcopy(trained)
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    FinePruning(FinePruning.Options(epochs=1, augment=False, batch_size=16, samples_per_epoch=0)).apply(
        model, bonafide, context()
    )
    assert seen
    assert all(row.numpy().tobytes() in allowed for batch in seen for row in batch)


def test_fine_pruning_registers_through_the_hook():
    registered = []
    fine_pruning.register_defenses(register=registered.append)
    assert registered == [FinePruning] and FinePruning.name == "fine_pruning"
