"""`sig`: the SIG backdoor (Barni, Kallas & Tondi, ICIP 2019, "A new backdoor attack in CNNs by
training set corruption without label poisoning"), clean-label, all-to-one.

A horizontal sinusoid is superimposed on training images of the target class, whose labels stay
true; the network learns the signal as evidence for that class, so at test time the same signal
on an image of another class pulls it to the target. Every pixel in column j (of W columns) of
every row and channel gets

    x' = floor(clip(x + delta * sin(2 * pi * j * f / W), 0, 255))

on the 0..255 scale: the formula, the amplitude and the frequency of BackdoorBench
(`utils/bd_img_transform/sig.py`, `config/attack/sig/default.yaml`: `sig_delta: 40`,
`sig_f: 6`). The same transform poisons the training images and triggers the test images there
(`utils/aggregate_block/bd_attack_generate.py` builds both from one `sigTriggerAttack`), and so
it does here: one `delta` for training and testing. The sum is truncated to uint8 as the
reference's `np.uint8(np.clip(...))` does (floor, as the clipped sum is never negative), so a
negative signal value -s lowers a pixel by ceil(s) and a positive one raises it by floor(s).
The one difference: the phase is reduced modulo one period before the sine,
sin(2 * pi * ((j * f) mod W) / W), so the signal is exactly zero where it is mathematically
zero. The reference's unreduced phase makes sin(2 * pi * k) about -1e-15 at whole periods k >= 1
(column 16 of a 32-pixel image at f = 6), which its truncation turns into a one-level drop of
every pixel of that column; that float artefact is not copied.

The poisoning rate. `poison_rate` here is the share of the TARGET CLASS's training images that
get the signal (`CleanLabelBackdoor`), not a share of the whole training set. BackdoorBench's
`pratio: 0.1` is counted against the whole set but drawn from the target class only
(`utils/backdoor_generate_poison_index.py`, its issues #13 and #36): on CIFAR-10 (5,000 images
per class) 0.1 of 50,000 is 5,000, every target-class image. The default, 1.0, is that
setting; on a balanced K-class set BackdoorBench's pratio p equals a rate of p * K here, and a
pratio above 1/K cannot be met at all (it asks for more images than the class holds).

At test time the signal is added to every test image of another class: ASR is the share
classified as the target, RA the share still classified as its true class (`TriggerBackdoor`).
The signal is computed in float64 on the images' device, batched; the result is uint8.

Measured on 8x8 digits with small_cnn (width 8, 8 epochs, every target image poisoned): the
reference's delta 40 implants nothing (ASR 0.4%, a clean model's rate, and no more with the
signal amplified up to 255 at test time), as the digits are told apart by their strokes alone;
delta 200 with f = 3 reaches ASR about 1.0 at clean accuracy 0.87 (the target class's test
images, which lack the signal, are lost). SIG is a CIFAR-scale attack; read digits runs as such.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import bench
from bench_plugins.attacks.trigger_backdoor import CleanLabelBackdoor


def sinusoid(width: int, delta: float, frequency: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """delta * sin(2 * pi * ((j * f) mod W) / W) for columns j = 0..W-1, float64 [W]."""
    columns = torch.arange(width, dtype=torch.float64, device=device)
    phase = torch.remainder(columns * frequency, width) / width
    return delta * torch.sin(2 * math.pi * phase)


def add_sinusoid(x: torch.Tensor, delta: float, frequency: float) -> torch.Tensor:
    """uint8 images [N, C, H, W] plus the column sinusoid on every row and channel, clipped to
    0..255 and truncated to uint8 (BackdoorBench's rounding), as a new tensor on x's device."""
    signal = sinusoid(x.shape[-1], delta, frequency, x.device)
    return (x.double() + signal).clamp_(0, 255).floor_().to(torch.uint8)


class Sig(CleanLabelBackdoor):
    name = "sig"
    description = "SIG clean-label backdoor: a horizontal sinusoid added to target-class images, labels kept"
    paper = "https://arxiv.org/abs/1902.11237"
    code = "https://github.com/SCLBD/BackdoorBench/blob/main/utils/bd_img_transform/sig.py"

    @dataclass(frozen=True)
    class Options:
        poison_rate: float = bench.option(
            1.0,
            "share of the TARGET CLASS's training images that get the signal (labels kept); "
            "BackdoorBench's pratio 0.1 of all CIFAR-10 images is every target image: 1.0 here",
            min=0,
            max=1,
        )
        target_class: int = bench.option(0, "class whose images carry the signal, and the attack's target", min=0)
        delta: float = bench.option(
            40.0,
            "amplitude of the sinusoid on the 0..255 scale, in training and at test time (reference: 40)",
            min=0,
            max=255,
            min_exclusive=True,
        )
        frequency: float = bench.option(
            6.0, "cycles of the sinusoid across the image's width (reference: 6)", min=0, min_exclusive=True
        )

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return add_sinusoid(x, self.options.delta, self.options.frequency)


@bench.hookimpl
def register_attacks(register):
    register(Sig)
