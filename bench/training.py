"""Supervised training on device-resident uint8 images, with augmentation on the device.

Used to train the attacked model and by defenses that fine-tune. The loop never syncs with the
host inside an epoch: losses are summed on the device and read once per epoch.

Defenses train on a small bonafide set with a budget that must not shrink with its size: the
MCR reference code (IBM/model-sanitization, `data.loaders_part_test`) repeats the N bonafide
images until they fill a 10,000-image epoch, so its "100 epochs" are about 7,900 steps of 128
whether N is 50 or 2500. `samples_per_epoch` does the same here (`REFERENCE_SAMPLES_PER_EPOCH`).
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


REFERENCE_SAMPLES_PER_EPOCH = 10_000  # the MCR reference's repeated bonafide loader


def epoch_size(images: int, samples_per_epoch: int) -> int:
    """Samples drawn per epoch: `samples_per_epoch` when the data is smaller (the images are
    repeated to fill it, as the MCR reference's loader does), else one pass; 0 means one pass."""
    return max(images, samples_per_epoch)


def steps_per_epoch(images: int, batch_size: int, samples_per_epoch: int = 0) -> int:
    return math.ceil(epoch_size(images, samples_per_epoch) / batch_size)


def epoch_order(images: int, samples_per_epoch: int, generator: torch.Generator, device) -> torch.Tensor:
    """The indices of one epoch: the images repeated (each equally often, up to one) to fill
    `epoch_size`, in a random order. With samples_per_epoch <= images, a permutation."""
    size = epoch_size(images, samples_per_epoch)
    repeated = torch.arange(size, device=device) % images
    return repeated[torch.randperm(size, device=device, generator=generator)]


def reference_lr_factor(epoch: int, epochs: int) -> float:
    """The MCR reference's schedule (dnn-mode-connectivity, also its fine-tuning baseline), for
    epoch 0..epochs-1: with progress p = (epoch + 1) / epochs, 1 while p <= 0.5, then linear down
    to 0.01 at p = 0.9, and 0.01 after."""
    progress = (epoch + 1) / epochs
    if progress <= 0.5:
        return 1.0
    if progress <= 0.9:
        return 1.0 - (progress - 0.5) / 0.4 * 0.99
    return 0.01


def cosine_lr_factor(epoch: int, epochs: int) -> float:
    """Per-epoch cosine annealing to zero (torch's CosineAnnealingLR with T_max = epochs, stepped
    once per epoch, as BackdoorBench's defenses use it), for epoch 0..epochs-1."""
    return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def lr_schedule(recipe: TrainRecipe, total_steps: int):
    """Linear warm-up to `recipe.lr`, then linear decay to zero, as a LambdaLR factor."""
    warmup = max(1, int(recipe.warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def sgd_optimizer(model: nn.Module, recipe: TrainRecipe, nesterov: bool | None = None) -> torch.optim.SGD:
    """SGD with the recipe's learning rate and momentum, weight decay on weights only (not on
    biases and norm parameters); Nesterov whenever momentum is used unless `nesterov` says."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() <= 1 else decay).append(p)
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        momentum=recipe.momentum,
        nesterov=recipe.momentum > 0 if nesterov is None else nesterov and recipe.momentum > 0,
    )


def _train_epoch(
    model, data, order, recipe, ctx, optimizer, scheduler, flip, generator, perturb, batch_transform=None
) -> torch.Tensor:
    """One pass over `order` in batches; returns the summed loss as a device tensor (no sync)."""
    loss_sum = torch.zeros((), device=ctx.device)
    for start in range(0, len(order), recipe.batch_size):
        idx = order[start : start + recipe.batch_size]
        xb = data.x[idx]
        if recipe.augment:
            xb = random_crop_flip(xb, recipe.crop_padding, flip, generator)
        inputs, labels = to_model_input(xb), data.y[idx]
        if batch_transform is not None:
            inputs, labels = batch_transform(inputs, labels, generator)
        if perturb is not None:
            inputs = perturb(inputs, labels, generator)
        with ctx.autocast():
            logits = model(inputs)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=recipe.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.detach() * len(idx)
    return loss_sum


def train_classifier(
    model: nn.Module,
    data: ImageData,
    recipe: TrainRecipe,
    ctx: RunContext,
    *,
    flip: bool,
    stream: str = "train",
    desc: str = "train",
    perturb: Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    samples_per_epoch: int = 0,
    reference_schedule: bool = False,
    cosine_schedule: bool = False,
    nesterov: bool | None = None,
    batch_transform: Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    | None = None,
) -> list[float]:
    """Train `model` in place on `data` (already on `ctx.device`) following `recipe`. `perturb(x,
    y, generator)`, if given, replaces each augmented float batch before the step (adversarial
    training); `batch_transform(x, y, generator) -> (x, y)`, if given, changes each augmented
    float batch and its labels first (an attack that controls training, such as WaNet's warped
    and noise-warped images; the batch keeps its size). `samples_per_epoch` repeats small data
    to fill each epoch (see `epoch_order`). `reference_schedule` replaces the recipe's warm-up
    and linear decay by the MCR reference's per-epoch schedule (`reference_lr_factor`),
    `cosine_schedule` by per-epoch cosine annealing (`cosine_lr_factor`). `nesterov` (default:
    whenever momentum is used) picks Nesterov or plain momentum; the reference baselines use
    plain. Returns the mean training loss of each epoch."""
    if reference_schedule and cosine_schedule:
        raise ValueError("train_classifier: choose reference_schedule or cosine_schedule, not both")
    generator = ctx.generator(stream)
    model.train()
    optimizer = sgd_optimizer(model, recipe, nesterov)
    total_steps = recipe.epochs * steps_per_epoch(len(data), recipe.batch_size, samples_per_epoch)
    per_epoch = reference_lr_factor if reference_schedule else cosine_lr_factor if cosine_schedule else None
    if per_epoch is not None:
        scheduler = None
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(recipe, total_steps))
    epoch_losses = []
    bar = ctx.progress(range(recipe.epochs), desc=desc)
    for epoch in bar:
        if per_epoch is not None:
            for group in optimizer.param_groups:
                group["lr"] = recipe.lr * per_epoch(epoch, recipe.epochs)
        order = epoch_order(len(data), samples_per_epoch, generator, ctx.device)
        loss_sum = _train_epoch(
            model, data, order, recipe, ctx, optimizer, scheduler, flip, generator, perturb, batch_transform
        )
        epoch_losses.append(loss_sum.item() / len(order))
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{epoch_losses[-1]:.3f}")
    model.eval()
    return epoch_losses
