"""`adversarial_training`: train on adversarial examples of the bonafide set.

Two methods:
- `pgd`: Madry et al. (2018) PGD adversarial training, every batch replaced by L-inf PGD
  examples (`steps` steps of `step`, random start) of the current model;
- `fgsm_rs`: "fast" adversarial training (Wong, Rice & Kolter 2020), one FGSM step of
  1.25 x eps from a uniform random start, about `steps` times cheaper.

Training starts from the given model's weights (adversarial fine-tuning), or with
`from_scratch` from freshly initialised ones (then raise `epochs`). The examples are built
with the model in train mode, as both papers do. SGD with Nesterov momentum, linear warm-up
and decay (`bench.training.lr_schedule`), the model family's crop/flip augmentation, bf16
autocast on CUDA with the loss in float32, and no host sync inside an epoch.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

import torch

import bench
from bench.toolkit import Norm, pgd_attack
from bench.toolkit import train_classifier

FGSM_RS_STEP_RATIO = 1.25  # Wong et al. 2020: a step of 1.25 eps avoids catastrophic overfitting at 8/255


class Method(enum.Enum):
    PGD = "pgd"
    FGSM_RS = "fgsm_rs"


def reset_parameters(model: torch.nn.Module) -> None:
    """Re-initialise every layer that knows how (conv, linear, batch norm)."""
    for module in model.modules():
        for method in ("reset_parameters", "reset_running_stats"):
            reset = getattr(module, method, None)
            if callable(reset):
                reset()


class AdversarialTraining(bench.Defense):
    name = "adversarial_training"
    description = "Adversarial training on the bonafide set: Madry PGD-AT or fast FGSM with random start"
    paper = "https://arxiv.org/abs/1706.06083"

    @dataclass(frozen=True)
    class Options:
        method: Method = bench.option(Method.PGD, "'pgd' (Madry et al.) or 'fgsm_rs' (Wong et al., fast)")
        eps: float = bench.option(8 / 255, "L-inf budget of the training examples", min=0, max=1)
        step: float = bench.option(
            2 / 255, "PGD step size ('fgsm_rs' always steps 1.25 x eps)", min=0, min_exclusive=True
        )
        steps: int = bench.option(10, "PGD steps per training example ('pgd' only)", min=1)
        epochs: int = bench.option(10, "passes over the bonafide set", min=1)
        lr: float = bench.option(
            0.05, "peak learning rate (warm-up, then linear decay to zero)", min=0, min_exclusive=True
        )
        batch_size: int = bench.option(128, "images per step", min=1)
        weight_decay: float = bench.option(5e-4, "L2 weight decay", min=0)
        from_scratch: bool = bench.option(False, "re-initialise the weights first instead of fine-tuning")

    def adversarial_batch(self, model, x: torch.Tensor, y: torch.Tensor, ctx, generator) -> torch.Tensor:
        o = self.options
        if o.method is Method.PGD:
            return pgd_attack(
                model,
                x,
                y,
                eps=o.eps,
                step=o.step,
                steps=o.steps,
                norm=Norm.LINF,
                random_start=True,
                generator=generator,
                autocast=ctx.autocast,
            )
        return pgd_attack(
            model,
            x,
            y,
            eps=o.eps,
            step=FGSM_RS_STEP_RATIO * o.eps,
            steps=1,
            norm=Norm.LINF,
            random_start=True,
            generator=generator,
            autocast=ctx.autocast,
        )

    def apply(self, model, bonafide, ctx):
        o = self.options
        if o.from_scratch:
            reset_parameters(model)
        recipe = dataclasses.replace(
            ctx.recipe, epochs=o.epochs, lr=o.lr, batch_size=o.batch_size, weight_decay=o.weight_decay
        )
        train_classifier(
            model,
            bonafide,
            recipe,
            ctx,
            flip=ctx.horizontal_flip,
            stream="adversarial_training",
            desc=f"adversarial training ({o.method.value})",
            perturb=lambda x, y, generator: self.adversarial_batch(model, x, y, ctx, generator),
        )
        return model.eval()


@bench.hookimpl
def register_defenses(register):
    register(AdversarialTraining)
