import numpy as np
import pytest
import torch
from torch import nn

from bench import ImageData, OptionError, RunContext
from bench.options import parse_options
from bench_plugins.attacks.blended import Blended, Trigger, blend, make_trigger

CPU = RunContext(device=torch.device("cpu"), seed=0, num_classes=10)


def test_blend_is_the_rounded_convex_combination_for_every_pixel_pair():
    values = torch.arange(256, dtype=torch.uint8)
    x = values.view(256, 1, 1, 1).expand(256, 1, 1, 256).contiguous()  # image i holds value i everywhere
    trigger = values.view(1, 1, 256)  # column j of the trigger holds value j
    out = blend(x, trigger, 0.2)
    pixels = np.arange(256, dtype=np.float64)
    expected = np.rint(0.8 * pixels[:, None] + 0.2 * pixels[None, :])
    assert out.dtype == torch.uint8
    assert np.array_equal(out[:, 0, 0, :].numpy(), expected.astype(np.uint8))


def test_noise_trigger_is_fixed_by_its_seed_and_stripes_alternate():
    first = make_trigger(Trigger.NOISE, (3, 8, 8), seed=0, stripe_width=2)
    assert torch.equal(first, make_trigger(Trigger.NOISE, (3, 8, 8), seed=0, stripe_width=2))
    assert not torch.equal(first, make_trigger(Trigger.NOISE, (3, 8, 8), seed=1, stripe_width=2))
    assert first.float().std() > 50  # spread over the whole pixel range
    stripes = make_trigger(Trigger.STRIPES, (1, 4, 8), seed=0, stripe_width=2)
    assert stripes[0, 0].tolist() == [255, 255, 0, 0, 255, 255, 0, 0]
    assert torch.equal(stripes[0, 0], stripes[0, 3])


def test_poisoning_blends_and_relabels_exactly_the_reported_non_target_images():
    gen = torch.Generator().manual_seed(0)
    train = ImageData(torch.randint(0, 256, (200, 3, 8, 8), dtype=torch.uint8, generator=gen), torch.arange(200) % 10)
    attack = Blended(Blended.Options(poison_rate=0.15, target_class=4, alpha=0.2))
    poisoned, state = attack.poison(train, CPU)
    idx = state["poisoned_indices"]
    assert len(idx) == 30 and len(idx.unique()) == 30 and (train.y[idx] != 4).all()
    assert (poisoned.y[idx] == 4).all()
    trigger = make_trigger(Trigger.NOISE, (3, 8, 8), seed=0, stripe_width=2)
    expected = torch.round(0.8 * train.x[idx].double() + 0.2 * trigger.double()).to(torch.uint8)
    assert torch.equal(poisoned.x[idx], expected)
    untouched = torch.ones(200, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(poisoned.x[untouched], train.x[untouched])
    assert torch.equal(poisoned.y[untouched], train.y[untouched])
    assert train.y.tolist() == (torch.arange(200) % 10).tolist()  # the input is not modified


class _AlwaysClass(nn.Module):
    def __init__(self, label: int):
        super().__init__()
        self.label = label

    def forward(self, x):
        return nn.functional.one_hot(torch.full((len(x),), self.label), 10).float()


def test_evaluate_counts_only_images_outside_the_target_class():
    test = ImageData(torch.zeros(20, 1, 8, 8, dtype=torch.uint8), torch.arange(20) % 10)
    attack = Blended(Blended.Options(target_class=2))
    assert attack.evaluate(_AlwaysClass(2), test, CPU, {}) == {"asr": 1.0, "ra": 0.0}
    assert attack.evaluate(_AlwaysClass(5), test, CPU, {})["ra"] == pytest.approx(1 / 9)


def test_offline_only_triggers_are_offered():
    with pytest.raises(OptionError, match="'noise'"):
        parse_options(Blended.Options, {"trigger": "hello_kitty"}, "suite.toml [[attacks]] blended")
    assert parse_options(Blended.Options, {"trigger": "stripes"}, "x").trigger is Trigger.STRIPES
