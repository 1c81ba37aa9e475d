"""`finetune`: fine-tune every weight of the model on the bonafide set, the baseline that
MCR and pruning defenses are compared with."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import bench
from bench.training import train_classifier


class FineTune(bench.Defense):
    name = "finetune"
    description = "Fine-tune all weights on the bonafide set (SGD, linear lr decay)"

    @dataclass(frozen=True)
    class Options:
        epochs: int = bench.option(10, "passes over the bonafide set", min=1)
        lr: float = bench.option(0.01, "initial learning rate, decayed linearly to zero", min=0, min_exclusive=True)
        batch_size: int = bench.option(128, "images per step", min=1)
        weight_decay: float = bench.option(5e-4, "L2 weight decay", min=0)
        augment: bool = bench.option(True, "use the model's training augmentation (crop, and flip where valid), when its recipe augments")

    def apply(self, model, bonafide, ctx):
        o = self.options
        recipe = dataclasses.replace(ctx.recipe, epochs=o.epochs, lr=o.lr, batch_size=o.batch_size,
                                     weight_decay=o.weight_decay, warmup_fraction=0.0,
                                     augment=o.augment and ctx.recipe.augment)
        train_classifier(model, bonafide, recipe, ctx, flip=ctx.horizontal_flip, stream="finetune",
                         desc="finetune")
        return model


@bench.hookimpl
def register_defenses(register):
    register(FineTune)
