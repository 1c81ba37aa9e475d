"""`ft_sam`: fine-tuning with sharpness-aware minimisation (Zhu, Wei, Shen, Fan & Wu, ICCV 2023,
"Enhancing Fine-Tuning Based Backdoor Defense with Sharpness-Aware Minimization").

Plain fine-tuning on a little clean data barely moves the neurons a backdoor lives in, and those
tend to have large weight norms. FT-SAM fine-tunes with adaptive SAM (ASAM, Kwon et al. 2021),
whose weight perturbation grows with each weight's magnitude, so the large-norm neurons are
pushed hardest and shrink. Each step on a batch:

1. g = the gradient of the loss at the weights w (train mode; batch-norm statistics update).
2. Ascend: e = rho * T^2 g / ||T g|| with T = |w| elementwise (ASAM, the default), or
   e = rho * g / ||g|| (SAM, Foret et al. 2021, with `adaptive = false`); the norm is over all
   parameters together.
3. g' = the gradient of the loss at w + e (batch statistics again, running statistics untouched).
4. Back to w, and the base optimizer (SGD, momentum 0.9, weight decay on w) steps with g'.

The loss is cross-entropy against label-smoothed targets as the reference smooths them (1 - s on
the true class, s / (classes - 1) on each other; s = 0.1).

Defaults: the authors' code is BackdoorBench's `defense/ft-sam.py` with
`config/defense/ft-sam/cifar10.yaml`: rho 2 (rho_max = rho_min = 2, so constant), adaptive (its
`--adaptive` flag is `store_false`, so ASAM unless the flag is given; rho 2 is an ASAM-sized
radius, far too large for plain SAM), alpha 0 (GSAM's gradient decomposition off), label
smoothing 0.1, SGD lr 0.01 with momentum 0.9 and weight decay 5e-4 on every parameter, batch
256, 100 epochs, the training transform (random crop and flip), model in train mode. An epoch
is `samples_per_epoch` samples (the bonafide images repeated to fill it, as `finetune` does),
BackdoorBench's epoch of its 2,500 clean images (5% of CIFAR-10), so the budget, 100 epochs of
about 10 steps of 256, does not shrink with the bonafide size. Augmentation follows the model's
recipe (crop padding, and flips where the dataset allows) when that recipe augments.

Deviation: BackdoorBench steps its CosineAnnealingLR (T_max 100) once per batch, so its lr
falls to zero and rises again every 100 batches; here the lr is cosine-annealed once over the
epochs (per epoch, as `fine_pruning` reads BackdoorBench's schedule). Nothing is selected on
any data: the defense has no selection step.

Returns a `bench.Defended` with the series `ft_sam_epochs`: per epoch, the mean loss at w and
at the perturbed w + e (their difference is the sharpness SAM minimises).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import bench
from bench.toolkit import cosine_lr_factor, epoch_order, random_crop_flip, to_model_input

BACKDOORBENCH_CLEAN_IMAGES = 2_500  # BackdoorBench's defender set: 5% of CIFAR-10's training set
MOMENTUM = 0.9  # BackdoorBench's sgd_momentum
PERTURBATION_EPS = 1e-12  # the reference's perturb_eps in rho / (||g|| + eps)


def smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Mean cross-entropy against targets with 1 - smoothing on the true class and
    smoothing / (classes - 1) on each other (the reference's `smooth_crossentropy`, up to the
    targets' constant entropy)."""
    classes = logits.shape[1]
    targets = torch.full_like(logits, smoothing / (classes - 1))
    targets.scatter_(1, labels[:, None], 1.0 - smoothing)
    return torch.sum(-targets * F.log_softmax(logits, dim=1), dim=1).mean()


def _loss_and_gradients(model, params, inputs, labels, smoothing, ctx):
    with ctx.autocast():
        logits = model(inputs)
    loss = smoothed_cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels, smoothing)
    return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)


def _batchnorm_state(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(buffer, saved copy) of every batch-norm running statistic and batch counter."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return [(b, b.clone()) for m in norms for b in m.buffers()]


def sam_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    ctx: bench.RunContext,
    *,
    rho: float,
    adaptive: bool,
    label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One (A)SAM step on a batch of float images (module docstring, steps 1-4): the optimizer's
    parameters move by its own rule applied to the gradient at the perturbed weights. Batch-norm
    running statistics change only in the first pass. Returns the loss at w and at w + e, as
    device tensors (no sync)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    loss, first = _loss_and_gradients(model, params, inputs, labels, label_smoothing, ctx)
    used = [(p, g) for p, g in zip(params, first) if g is not None]
    with torch.no_grad():
        scaled = [g * p.abs() if adaptive else g for p, g in used]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
        scale = rho / (norm + PERTURBATION_EPS)
        steps = [s * p.abs() * scale if adaptive else s * scale for (p, _), s in zip(used, scaled)]
        for (p, _), e in zip(used, steps):
            p.add_(e)
    saved = _batchnorm_state(model)
    perturbed_loss, second = _loss_and_gradients(model, params, inputs, labels, label_smoothing, ctx)
    with torch.no_grad():
        for buffer, copy in saved:
            buffer.copy_(copy)
        for (p, _), e in zip(used, steps):
            p.sub_(e)
    for p, g in zip(params, second):
        p.grad = g
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, perturbed_loss


class FTSAM(bench.Defense):
    name = "ft_sam"
    description = "FT-SAM: fine-tune on the bonafide set with adaptive sharpness-aware minimisation"
    paper = "https://arxiv.org/abs/2304.11823"
    code = "https://github.com/SCLBD/BackdoorBench"
    defender_data = bench.DefenderData.BONAFIDE

    @dataclass(frozen=True)
    class Options:
        epochs: int = bench.option(100, "epochs of samples_per_epoch samples (BackdoorBench 100)", min=1)
        samples_per_epoch: int = bench.option(
            BACKDOORBENCH_CLEAN_IMAGES,
            "samples per epoch, the bonafide images repeated to fill it (BackdoorBench: one pass over 2,500); "
            "0: one pass over the bonafide set",
            min=0,
        )
        lr: float = bench.option(
            0.01,
            "SGD learning rate, cosine-annealed to zero over the epochs (BackdoorBench 0.01)",
            min=0,
            min_exclusive=True,
        )
        batch_size: int = bench.option(256, "images per step (BackdoorBench 256)", min=1)
        weight_decay: float = bench.option(5e-4, "L2 weight decay on every parameter (BackdoorBench 5e-4)", min=0)
        rho: float = bench.option(2.0, "radius of the weight perturbation (BackdoorBench rho 2)", min=0)
        adaptive: bool = bench.option(
            True, "ASAM: scale the perturbation by each weight's magnitude (BackdoorBench's default); false: SAM"
        )
        label_smoothing: float = bench.option(0.1, "label smoothing of the loss (BackdoorBench 0.1)", min=0, max=1)
        augment: bool = bench.option(
            True, "use the model's training augmentation when its recipe augments (BackdoorBench's train transform)"
        )

    def apply(self, model, bonafide, ctx):
        o = self.options
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=o.lr, momentum=MOMENTUM, weight_decay=o.weight_decay)
        generator = ctx.generator("ft_sam")
        augment = o.augment and ctx.recipe.augment
        epochs = []
        model.train()
        for epoch in ctx.progress(range(o.epochs), desc="ft_sam"):
            for group in optimizer.param_groups:
                group["lr"] = o.lr * cosine_lr_factor(epoch, o.epochs)
            order = epoch_order(len(bonafide), o.samples_per_epoch, generator, ctx.device)
            sums = torch.zeros(2, device=ctx.device)
            for start in range(0, len(order), o.batch_size):
                idx = order[start : start + o.batch_size]
                images = bonafide.x[idx]
                if augment:
                    images = random_crop_flip(images, ctx.recipe.crop_padding, ctx.horizontal_flip, generator)
                losses = sam_step(
                    model,
                    optimizer,
                    to_model_input(images),
                    bonafide.y[idx],
                    ctx,
                    rho=o.rho,
                    adaptive=o.adaptive,
                    label_smoothing=o.label_smoothing,
                )
                sums += torch.stack(losses) * len(idx)
            epochs.append(sums / len(order))
        model.eval()
        means = torch.stack(epochs).tolist()
        series = [{"epoch": e, "loss": loss, "perturbed_loss": sharp} for e, (loss, sharp) in enumerate(means)]
        return bench.Defended(model, series={"ft_sam_epochs": series})


@bench.hookimpl
def register_defenses(register):
    register(FTSAM)
