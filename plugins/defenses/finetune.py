"""`finetune`: fine-tune every weight of the model on the bonafide set, the baseline that
MCR and pruning defenses are compared with.

Defaults follow the MCR reference's baseline (IBM/model-sanitization `train_baseline.py`): 100
epochs of 10,000 samples (the bonafide images repeated to fill each epoch, so the budget does
not shrink with the bonafide size), batch 128, SGD lr 0.015 with (plain) momentum 0.9 and weight decay
1e-4, lr constant for half of training then linearly down to 1% by 90%, and no augmentation
(the reference loads the bonafide images with the test transform).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import bench
from bench.toolkit import REFERENCE_SAMPLES_PER_EPOCH, train_classifier


class FineTune(bench.Defense):
    name = "finetune"
    description = "Fine-tune all weights on the bonafide set (the MCR reference's baseline budget and schedule)"
    code = "https://github.com/IBM/model-sanitization"

    @dataclass(frozen=True)
    class Options:
        epochs: int = bench.option(100, "epochs of samples_per_epoch samples each", min=1)
        samples_per_epoch: int = bench.option(
            REFERENCE_SAMPLES_PER_EPOCH,
            "samples per epoch: the bonafide images are repeated to fill it, so the "
            "budget is the same for every bonafide size (reference: 10,000); 0: one pass over the bonafide set",
            min=0,
        )
        lr: float = bench.option(
            0.015, "initial learning rate; constant for half, then down to 1% by 90%", min=0, min_exclusive=True
        )
        batch_size: int = bench.option(128, "images per step", min=1)
        weight_decay: float = bench.option(1e-4, "L2 weight decay", min=0)
        augment: bool = bench.option(
            False,
            "use the model's training augmentation (crop, and flip where valid), "
            "when its recipe augments; the reference does not",
        )

    def apply(self, model, bonafide, ctx):
        fine_tune(model, bonafide, ctx, self.options, stream="finetune", desc="finetune", reference_schedule=True)
        return model


def fine_tune(model, bonafide, ctx, options, *, stream: str, desc: str, **schedule) -> None:
    """Train `model` on the bonafide images with plain momentum (the references' SGD), the
    options' `epochs` of `samples_per_epoch`, `lr`, `batch_size`, `weight_decay` and `augment`
    (only where the model's recipe augments), no warm-up; `schedule` picks the learning-rate
    schedule (`reference_schedule=True` or `cosine_schedule=True`). Shared with
    `fine_pruning`'s fine-tuning."""
    recipe = dataclasses.replace(
        ctx.recipe,
        epochs=options.epochs,
        lr=options.lr,
        batch_size=options.batch_size,
        weight_decay=options.weight_decay,
        warmup_fraction=0.0,
        augment=options.augment and ctx.recipe.augment,
    )
    train_classifier(
        model,
        bonafide,
        recipe,
        ctx,
        flip=ctx.horizontal_flip,
        stream=stream,
        desc=desc,
        samples_per_epoch=options.samples_per_epoch,
        nesterov=False,
        **schedule,
    )


@bench.hookimpl
def register_defenses(register):
    register(FineTune)
