"""`weight_average_finetune`, MCR's control: the average of MCR's two endpoints, batch norm
recomputed on the bonafide images, fine-tuned at MCR's budget."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bench
from bench.errors import BenchError
from bench_plugins.defenses import weight_average_finetune
from bench_plugins.defenses.mcr import Endpoint, ModeConnectivityRepair, recompute_batchnorm
from bench_plugins.defenses.weight_average_finetune import WeightAverageFineTune
from test_mcr import context as mcr_context
from test_mcr import tiny_model


def context(**kwargs) -> bench.DefenseContext:
    return mcr_context(**{"seed": 3, **kwargs})


def bonafide_images(count: int = 48) -> bench.ImageData:
    generator = torch.Generator().manual_seed(0)
    return bench.ImageData(
        torch.randint(0, 256, (count, 1, 8, 8), dtype=torch.uint8, generator=generator),
        torch.randint(0, 10, (count,), generator=generator),
    )


def test_without_fine_tuning_it_is_the_midpoint_of_mcrs_endpoints_with_bonafide_batch_norm():
    model, second = tiny_model(0), tiny_model(1)
    asked = []

    def second_model(seed):
        asked.append(seed)
        return second

    defense = WeightAverageFineTune(WeightAverageFineTune.Options(epochs=0))
    assert defense.other_attacked_seeds(3) == ModeConnectivityRepair().other_attacked_seeds(3) == (4,)
    bonafide = bonafide_images()
    averaged = defense.apply(copy.deepcopy(model), bonafide, context(attacked_model_with_seed=second_model))
    assert asked == [4]  # the same second model MCR joins to
    others = dict(second.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(dict(averaged.named_parameters())[name], (p + others[name]) / 2)
    expected = copy.deepcopy(averaged)
    recompute_batchnorm(expected, bonafide, context())
    for (name, mine), (_, theirs) in zip(averaged.named_buffers(), expected.named_buffers()):
        assert torch.equal(mine, theirs), name
    # the statistics are the bonafide images', not either endpoint's
    bn = next(m for m in averaged.modules() if isinstance(m, nn.BatchNorm2d))
    first_bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert not torch.equal(bn.running_mean, first_bn.running_mean)


def test_fine_tuning_starts_from_the_average_and_lowers_the_bonafide_loss():
    model, second = tiny_model(0), tiny_model(1)
    bonafide = bonafide_images()
    ctx = context(attacked_model_with_seed=lambda seed: second)
    start = WeightAverageFineTune(WeightAverageFineTune.Options(epochs=0)).apply(copy.deepcopy(model), bonafide, ctx)
    tuned = WeightAverageFineTune(
        WeightAverageFineTune.Options(epochs=3, samples_per_epoch=0, batch_size=16, lr=0.05)
    ).apply(copy.deepcopy(model), bonafide, ctx)

    def loss(net):
        with torch.no_grad():
            return nn.functional.cross_entropy(net(bonafide.x.float() / 255), bonafide.y).item()

    assert loss(tuned) < loss(start)
    moved = sum((a - b).norm() for a, b in zip(tuned.parameters(), start.parameters()))
    assert moved > 0


def test_finetuned_endpoint_works_without_a_second_model_and_second_seed_needs_one():
    bonafide = bonafide_images(32)
    with pytest.raises(BenchError, match="weight_average_finetune: endpoint 'second_seed'"):
        WeightAverageFineTune(WeightAverageFineTune.Options(epochs=0)).apply(tiny_model(0), bonafide, context())
    options = WeightAverageFineTune.Options(
        endpoint=Endpoint.FINETUNED, finetune_epochs=1, epochs=0, samples_per_epoch=0, batch_size=16
    )
    defense = WeightAverageFineTune(options)
    assert defense.other_attacked_seeds(0) == ()
    out = defense.apply(tiny_model(0), bonafide, context())
    assert all(torch.isfinite(p).all() for p in out.parameters())


def test_registers_through_the_hook():
    registered = []
    weight_average_finetune.register_defenses(register=registered.append)
    assert registered == [WeightAverageFineTune]
