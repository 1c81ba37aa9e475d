"""`badnets`: the BadNets backdoor (Gu et al. 2017), all-to-one.

A square trigger patch is stamped on `poison_rate` of the training images whose class is not
the target, and those images are relabelled to `target_class`. At test time the trigger is
stamped on every test image of another class: ASR is the share classified as the target, RA
the share still classified as their true class.

The trigger is applied to uint8 tensors on the device in one slice assignment. ART's backdoor
perturbations (`add_single_bd`, `add_pattern_bd`) are not used: they act on NumPy arrays in
channels-last layout with a fixed pattern and offset, where this attack needs a configurable
size, corner and value.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

import bench
from bench import BenchError
from bench_plugins.attacks.trigger_backdoor import TargetMode, TriggerBackdoor


class Corner(enum.Enum):
    BOTTOM_RIGHT = "bottom_right"
    BOTTOM_LEFT = "bottom_left"
    TOP_RIGHT = "top_right"
    TOP_LEFT = "top_left"


def stamp_trigger(x: torch.Tensor, size: int, corner: Corner, margin: int, value: int) -> torch.Tensor:
    """A copy of uint8 images [N, C, H, W] with a `size` x `size` square of `value`, `margin`
    pixels from the given corner."""
    height, width = x.shape[-2:]
    if size + margin > min(height, width):
        raise BenchError(
            f"badnets: a {size}-pixel trigger {margin} pixels from the border does not fit in "
            f"{height}x{width} images; lower trigger_size or trigger_margin"
        )
    top = margin if corner in (Corner.TOP_LEFT, Corner.TOP_RIGHT) else height - margin - size
    left = margin if corner in (Corner.TOP_LEFT, Corner.BOTTOM_LEFT) else width - margin - size
    out = x.clone()
    out[..., top : top + size, left : left + size] = value
    return out


class BadNets(TriggerBackdoor):
    name = "badnets"
    description = "BadNets backdoor: square trigger patch, poisoned images relabelled to one target class"
    paper = "https://arxiv.org/abs/1708.06733"
    code = "https://github.com/SCLBD/BackdoorBench/blob/main/attack/badnet.py"

    @dataclass(frozen=True)
    class Options:
        poison_rate: float = bench.option(0.1, "fraction of training images poisoned", min=0, max=1)
        target_class: int = bench.option(0, "class every triggered image is relabelled to", min=0)
        trigger_size: int = bench.option(3, "side of the square trigger, in pixels", min=1)
        trigger_corner: Corner = bench.option(Corner.BOTTOM_RIGHT, "corner the trigger is placed near")
        trigger_margin: int = bench.option(1, "pixels between the trigger and the image border", min=0)
        trigger_value: int = bench.option(255, "pixel value of the trigger (255: white)", min=0, max=255)
        target_mode: TargetMode = bench.option(
            TargetMode.ALL_TO_ONE,
            "all_to_one: poisoned images get target_class; all_to_all: label y becomes (y + 1) mod classes",
        )

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        o = self.options
        return stamp_trigger(x, o.trigger_size, o.trigger_corner, o.trigger_margin, o.trigger_value)


@bench.hookimpl
def register_attacks(register):
    register(BadNets)
