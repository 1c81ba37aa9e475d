"""`weight_average_finetune`: the control every MCR claim needs.

MCR joins the attacked model w0 to a second model w1 and trains a curve between them on the
bonafide set. Two cheaper things happen on the way that could explain a repair on their own:
averaging two independently trained models, and training on clean data. This defense does
exactly those two and nothing else: it takes the same two endpoints MCR uses (`endpoint`,
`seed_offset`: the attacked model with seed + 1 by default), averages every parameter,
(w0 + w1) / 2 (the curve's untrained bend), recomputes the batch-norm statistics on the
bonafide images (as MCR does at every path point), and fine-tunes the average on the bonafide
set with `finetune`'s reference recipe at MCR's budget: 100 epochs of 10,000 samples, batch 128,
SGD lr 0.015 with plain momentum 0.9, weight decay 1e-4, the reference schedule, no augmentation.

MCR's finding ("the middle of a trained curve removes the backdoor") counts as reproduced only
where MCR beats this control at the same budget. Its defense time includes training the second
endpoint, as MCR's does. It trains on every bonafide image; MCR with its default `clean_rule`
trains its curve on 80% of them and keeps the rest to choose t (a fixed t trains on all).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import bench
from bench.toolkit import REFERENCE_SAMPLES_PER_EPOCH
from bench_plugins.defenses.finetune import fine_tune
from bench_plugins.defenses.mcr import Endpoint, SecondEndpointOptions, recompute_batchnorm, second_endpoint


@torch.no_grad()
def average_parameters(model: torch.nn.Module, other: torch.nn.Module) -> None:
    """Set every parameter of `model` to the mean of its own value and `other`'s (in place);
    buffers (batch-norm statistics) are left for the caller to recompute."""
    others = dict(other.named_parameters())
    for name, p in model.named_parameters():
        p.copy_((p.float() + others[name].detach().to(p.device).float()).div_(2).to(p.dtype))


class WeightAverageFineTune(bench.Defense):
    name = "weight_average_finetune"
    description = (
        "MCR's control: average the two models MCR joins, recompute batch norm, fine-tune on the "
        "bonafide set at MCR's budget"
    )
    code = "https://github.com/IBM/model-sanitization"

    @dataclass(frozen=True)
    class Options(SecondEndpointOptions):  # the model averaged with the attacked one: MCR's options
        epochs: int = bench.option(100, "epochs of samples_per_epoch samples fine-tuning the average (MCR's)", min=0)
        samples_per_epoch: int = bench.option(
            REFERENCE_SAMPLES_PER_EPOCH,
            "samples per epoch: the bonafide images repeated to fill it (reference: 10,000); 0: one pass",
            min=0,
        )
        lr: float = bench.option(
            0.015,
            "initial learning rate (finetune's); constant for half, then down to 1% by 90%",
            min=0,
            min_exclusive=True,
        )
        batch_size: int = bench.option(128, "images per step", min=1)
        weight_decay: float = bench.option(1e-4, "L2 weight decay", min=0)
        augment: bool = bench.option(
            False, "use the model's training augmentation, when its recipe augments; MCR's reference does not"
        )

    def other_attacked_seeds(self, seed):
        return (seed + self.options.seed_offset,) if self.options.endpoint is Endpoint.SECOND_SEED else ()

    def apply(self, model, bonafide, ctx):
        o = self.options
        other = second_endpoint(model, bonafide, ctx, o, name=self.name)
        average_parameters(model, other)
        recompute_batchnorm(model, bonafide, ctx)
        if o.epochs > 0:
            fine_tune(
                model, bonafide, ctx, o, stream="weight_average_finetune", desc=self.name, reference_schedule=True
            )
        return model.eval()


@bench.hookimpl
def register_defenses(register):
    register(WeightAverageFineTune)
