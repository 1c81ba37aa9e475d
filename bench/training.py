"""Supervised training on device-resident uint8 images, with augmentation on the device.

Used to train the attacked model and by defenses that fine-tune. The loop never syncs with the
host inside an epoch: losses are summed on the device and read once per epoch.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bench.context import RunContext
from bench.data import ImageData
from bench.evaluation import to_model_input
from bench.models import TrainRecipe


def random_crop_flip(x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding, and a random horizontal flip, per image, in one gather.
    Works on uint8 or float [N, C, H, W] tensors on any device."""
    n, c, h, w = x.shape
    device = x.device
    if padding > 0:
        x = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), device=device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), device=device, generator=generator)
    rows = torch.arange(h, device=device)[None, :] + dy[:, None]
    cols = torch.arange(w, device=device)[None, :] + dx[:, None]
    if flip:
        mirrored = torch.rand(n, device=device, generator=generator) < 0.5
        cols = torch.where(mirrored[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=device)[:, None, None, None]
    channel = torch.arange(c, device=device)[None, :, None, None]
    return x[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def lr_schedule(recipe: TrainRecipe, total_steps: int):
    """Linear warm-up to `recipe.lr`, then linear decay to zero, as a LambdaLR factor."""
    warmup = max(1, int(recipe.warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    return factor


def train_classifier(model: nn.Module, data: ImageData, recipe: TrainRecipe, ctx: RunContext,
                     *, flip: bool, stream: str = "train", desc: str = "train",
                     perturb: Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                     ) -> list[float]:
    """Train `model` in place on `data` (already on `ctx.device`) following `recipe`.
    `perturb(x, y, generator)`, if given, replaces each augmented float batch before the step
    (adversarial training). Returns the mean training loss of each epoch."""
    generator = ctx.generator(stream)
    model.train()
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() <= 1 else decay).append(p)
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.momentum > 0)
    steps_per_epoch = math.ceil(len(data) / recipe.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(recipe, recipe.epochs * steps_per_epoch))
    epoch_losses = []
    bar = ctx.progress(range(recipe.epochs), desc=desc)
    for _ in bar:
        order = torch.randperm(len(data), device=ctx.device, generator=generator)
        loss_sum = torch.zeros((), device=ctx.device)
        for start in range(0, len(data), recipe.batch_size):
            idx = order[start:start + recipe.batch_size]
            xb = data.x[idx]
            if recipe.augment:
                xb = random_crop_flip(xb, recipe.crop_padding, flip, generator)
            inputs = to_model_input(xb)
            if perturb is not None:
                inputs = perturb(inputs, data.y[idx], generator)
            with ctx.autocast():
                logits = model(inputs)
            loss = F.cross_entropy(logits.float(), data.y[idx], label_smoothing=recipe.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach() * len(idx)
        epoch_losses.append(loss_sum.item() / len(data))
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{epoch_losses[-1]:.3f}")
    model.eval()
    return epoch_losses
