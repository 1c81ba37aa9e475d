"""Measurements the built-in analyses share: clean and PGD loss and accuracy of a model on a
set of images, batched, with one host read per measurement."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import bench
from bench.toolkit import Norm, pgd_attack, to_model_input


def clean_and_pgd(
    model: nn.Module, data: bench.ImageData, ctx: bench.RunContext, *, eps: float, steps: int, stream: str
) -> dict[str, float]:
    """Mean cross-entropy and accuracy of `model` on `data`, clean and under L-inf PGD (`steps`
    steps of 2.5 eps / steps, random start; FGSM when steps = 1), in eval mode."""
    return clean_and_pgd_per_image(model, data, ctx, eps=eps, steps=steps, stream=stream)[0]


def clean_and_pgd_per_image(
    model: nn.Module, data: bench.ImageData, ctx: bench.RunContext, *, eps: float, steps: int, stream: str
) -> tuple[dict[str, float], torch.Tensor]:
    """`clean_and_pgd`, and each image's adversarial cross-entropy (on the CPU), for statistics
    over images (a bootstrap of a path's loss barrier)."""
    model.eval()
    generator = ctx.generator(stream)
    sums = torch.zeros(4, device=ctx.device)  # clean loss, clean correct, adversarial loss, adversarial correct
    adversarial_losses = []
    step = eps if steps == 1 else 2.5 * eps / steps
    for start in range(0, len(data), ctx.eval_batch_size):
        x = to_model_input(data.x[start : start + ctx.eval_batch_size])
        y = data.y[start : start + ctx.eval_batch_size]
        x_adv = (
            x
            if eps == 0
            else pgd_attack(
                model,
                x,
                y,
                eps=eps,
                step=step,
                steps=steps,
                norm=Norm.LINF,
                random_start=steps > 1,
                generator=generator,
                autocast=ctx.autocast,
            )
        )
        with torch.no_grad(), ctx.autocast():
            for offset, inputs in ((0, x), (2, x_adv)):
                logits = model(inputs).float()
                losses = F.cross_entropy(logits, y, reduction="none")
                sums[offset] += losses.sum()
                sums[offset + 1] += (logits.argmax(dim=1) == y).sum()
            adversarial_losses.append(losses)
    clean_loss, clean_acc, adv_loss, adv_acc = (sums / len(data)).tolist()
    per_image = torch.cat(adversarial_losses).cpu() if adversarial_losses else torch.empty(0)
    return {"clean_loss": clean_loss, "clean_acc": clean_acc, "adv_loss": adv_loss, "robust_acc": adv_acc}, per_image
