"""`blended`: the Blended backdoor (Chen et al. 2017, "Targeted Backdoor Attacks on Deep
Learning Systems Using Data Poisoning", the blended injection strategy), all-to-one.

A trigger image as large as the input is alpha-blended over the whole image,
x' = round((1 - alpha) * x + alpha * trigger), on `poison_rate` of the training images (a share
of the whole training set, drawn from the classes other than the target, as `badnets` does),
and those images are relabelled to `target_class`. At test time the same blend is applied to
every test image of another class: ASR is the share classified as the target, RA the share still
classified as their true class.

alpha defaults to 0.2 for training and testing alike, BackdoorBench's setting for this attack
(Chen et al. study several training and test-time alphas). The paper's Hello Kitty
picture is not offered because it cannot be obtained offline; the triggers are generated:

- `noise` (default): a fixed image of uniform random pixels, drawn from `trigger_seed` (the same
  for every job seed, as an attacker's trigger is), Chen et al.'s random-pattern variant;
- `stripes`: vertical black and white stripes `stripe_width` pixels wide, a structured,
  low-entropy pattern for comparison.

Blending is done on the device in float32 and rounded back to uint8, so poisoned images are
valid images of the dataset's format.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

import bench
from bench_plugins.attacks.trigger_backdoor import TargetMode, TriggerBackdoor


class Trigger(enum.Enum):
    NOISE = "noise"
    STRIPES = "stripes"


def make_trigger(kind: Trigger, shape: tuple[int, int, int], seed: int, stripe_width: int) -> torch.Tensor:
    """The trigger image, uint8 [C, H, W] on the CPU; the same for the same arguments on any
    machine (drawn with a CPU generator)."""
    channels, height, width = shape
    if kind is Trigger.NOISE:
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    columns = (torch.arange(width) // stripe_width) % 2 == 0
    return (columns.to(torch.uint8) * 255).expand(channels, height, width).contiguous()


def blend(x: torch.Tensor, trigger: torch.Tensor, alpha: float) -> torch.Tensor:
    """uint8 images [N, C, H, W] blended with a uint8 trigger [C, H, W]:
    round((1 - alpha) * x + alpha * trigger), as a new uint8 tensor on x's device."""
    mixed = x.float().mul_(1 - alpha).add_(trigger.to(x.device).float().mul_(alpha))
    return mixed.round_().clamp_(0, 255).to(torch.uint8)


class Blended(TriggerBackdoor):
    name = "blended"
    description = "Blended backdoor: a trigger image alpha-blended over the whole input, relabelled to one class"
    paper = "https://arxiv.org/abs/1712.05526"
    code = "https://github.com/SCLBD/BackdoorBench/blob/main/attack/blended.py"

    @dataclass(frozen=True)
    class Options:
        poison_rate: float = bench.option(0.1, "fraction of training images poisoned", min=0, max=1)
        target_class: int = bench.option(0, "class every triggered image is relabelled to", min=0)
        alpha: float = bench.option(
            0.2, "blend weight of the trigger, in training and at test time", min=0, max=1, min_exclusive=True
        )
        trigger: Trigger = bench.option(Trigger.NOISE, "trigger image: seeded uniform noise, or vertical stripes")
        trigger_seed: int = bench.option(0, "seed of the noise trigger (fixed across job seeds)", min=0)
        stripe_width: int = bench.option(2, "width in pixels of each stripe of the stripes trigger", min=1)
        target_mode: TargetMode = bench.option(
            TargetMode.ALL_TO_ONE,
            "all_to_one: poisoned images get target_class; all_to_all: label y becomes (y + 1) mod classes",
        )

    def trigger_image(self, shape: tuple[int, int, int]) -> torch.Tensor:
        o = self.options
        return make_trigger(o.trigger, shape, o.trigger_seed, o.stripe_width)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        channels, height, width = x.shape[1:]
        return blend(x, self.trigger_image((channels, height, width)), self.options.alpha)


@bench.hookimpl
def register_attacks(register):
    register(Blended)
