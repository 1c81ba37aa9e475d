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


def test_noise_trigger_is_uniform_noise_fixed_by_its_seed_and_stripes_alternate():
    first = make_trigger(Trigger.NOISE, (3, 32, 32), seed=0, stripe_width=2)
    assert torch.equal(first, make_trigger(Trigger.NOISE, (3, 32, 32), seed=0, stripe_width=2))
    assert not torch.equal(first, make_trigger(Trigger.NOISE, (3, 32, 32), seed=1, stripe_width=2))
    # uniform over 0..255: each quarter of the range holds a quarter of the 3072 pixels
    quarters = torch.bincount(first.flatten().long() // 64, minlength=4) / first.numel()
    assert torch.allclose(quarters, torch.full((4,), 0.25), atol=0.03)
    stripes = make_trigger(Trigger.STRIPES, (3, 4, 9), seed=0, stripe_width=2)
    assert torch.equal(stripes, torch.tensor([255, 255, 0, 0, 255, 255, 0, 0, 255], dtype=torch.uint8).expand(3, 4, 9))
    assert make_trigger(Trigger.STRIPES, (1, 1, 6), seed=0, stripe_width=3)[0, 0].tolist() == [255] * 3 + [0] * 3


def test_poisoning_blends_and_relabels_exactly_the_reported_non_target_images():
    gen = torch.Generator().manual_seed(0)
    train = ImageData(torch.randint(0, 256, (200, 3, 8, 8), dtype=torch.uint8, generator=gen), torch.arange(200) % 10)
    original_x = train.x.clone()
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
    assert torch.equal(train.x, original_x)


class _AlwaysClass(nn.Module):
    def __init__(self, label: int):
        super().__init__()
        self.label = label

    def forward(self, x):
        return nn.functional.one_hot(torch.full((len(x),), self.label), 10).float()


class _FlatImageReader(nn.Module):
    """Reads the class off a flat image (pixel value 10 x class); answers `target` for any
    image that is not flat, as a model with a blended backdoor would."""

    def __init__(self, target: int):
        super().__init__()
        self.target = target

    def forward(self, x):
        flat = (x == x[:, :1, :1, :1]).flatten(1).all(dim=1)
        predicted = torch.where(flat, torch.round(x[:, 0, 0, 0] * 255 / 10).long(), self.target)
        return nn.functional.one_hot(predicted, 10).float()


def test_evaluate_blends_the_trigger_into_the_images_outside_the_target_class_only():
    labels = torch.arange(20) % 10
    test = ImageData((labels * 10).to(torch.uint8).view(20, 1, 1, 1).expand(20, 1, 8, 8).contiguous(), labels)
    attack = Blended(Blended.Options(target_class=2))
    assert _FlatImageReader(2)(test.x.float() / 255).argmax(1).tolist() == labels.tolist()  # reads clean images
    assert attack.evaluate(_FlatImageReader(2), test, CPU, {}) == {"asr": 1.0, "ra": 0.0}
    # 2 of the 18 images outside the target class are of class 5: RA 1/9 (2/20 if the target's counted)
    assert attack.evaluate(_AlwaysClass(5), test, CPU, {}) == {"asr": 0.0, "ra": pytest.approx(1 / 9)}


def test_offline_only_triggers_are_offered():
    with pytest.raises(OptionError, match="'noise'"):
        parse_options(Blended.Options, {"trigger": "hello_kitty"}, "suite.toml [[attacks]] blended")
    assert parse_options(Blended.Options, {"trigger": "stripes"}, "x").trigger is Trigger.STRIPES
