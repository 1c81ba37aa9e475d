"""`rnp`: Reconstructive Neuron Pruning (Li, Lyu, Ma, Koren, Lyu, Li & Jiang, ICML 2023).

Unlearning the clean task by gradient ascent destroys the clean features of a backdoored model
quickly but leaves its backdoor neurons in place; recovering the unlearned model with a mask per
neuron (batch-norm channel; conv output channel in a model without batch norm, see
`_neuron_masks`) then turns down exactly the neurons that unlearning strengthened, the backdoor
ones. Those neurons are pruned in the original model:

1. hold out `held_out_share` of the bonafide images (seeded); steps 2 and 3 use the rest;
2. unlearn a copy of the model: SGD (lr 0.01, momentum 0.9, weight decay 5e-4 on every
   parameter, lr x0.1 at each milestone epoch) *ascending* the cross-entropy, the gradient
   norm clipped to 20, for up to `unlearning_epochs` epochs, stopping after the first epoch in
   which the model's accuracy on the batches it trained on is at most `clean_threshold`;
3. recover: freeze the unlearned weights and learn masks m in [0, 1] (scaling each neuron's
   batch-norm gamma) minimising alpha * CE on the same images, SGD lr 0.2 with momentum 0.9,
   clipped to [0, 1] after each step, `recovering_epochs` epochs;
4. prune (zero the batch-norm gamma of) the neurons with the smallest masks in the ORIGINAL
   model, by the largest candidate whose held-out accuracy stays within `max_accuracy_drop` of
   the unpruned model's (`_neuron_masks.choose_pruning`).
Both unlearning and recovering run in train mode (batch statistics) on copies, as in the
references; the returned model keeps the original running statistics and weights but the
pruned gammas.

Defaults: alpha 0.2, clean_threshold 0.2, unlearning lr 0.01 and recovering lr 0.2, 20 + 20
epochs, milestones [10, 20], momentum 0.9, weight decay 5e-4, batch 128: BackdoorBench
`defense/rnp.py` (its argparse defaults; `config/defense/rnp/config.yaml` sets the rest, and there
is no cifar10.yaml for rnp) and the authors' `main.py` (bboylyg/RNP), which agree on all of
these but the batch (BackdoorBench's config 256, the authors' 128; we follow the authors) and
the unlearning epochs (the authors' loop runs 21). An unlearning epoch is one pass over the
images (`unlearning_samples_per_epoch` 0), as in both references, whose stopping rule is checked
per pass; a recovering epoch is `samples_per_epoch` = 500 samples, the references' defense set
(1% of CIFAR-10), the images repeated to fill it, so recovery takes at least the references' 80
steps whatever the bonafide size. Both references call the gradient clipping before the backward
pass, where it clips nothing; here it clips the ascent's gradient, as intended. Candidates as
for `anp` (BackdoorBench `pruning_by` threshold, `pruning_step` 0.05, `pruning_max` 0.9), a
neuron pruned when its mask is below the candidate, ties in mask value in layer order (the
references' stable sort). BackdoorBench's rnp returns the model pruned at its fixed
`pruning_number` 0.7 after also picking one by test ASR; here only the held-out bonafide images
decide, never test data.

On a network with few neurons (the 56 of a width-8 small_cnn) the masks move far faster than on
ResNet-18's 4,800: the default 80 recovering steps drive a third of them to zero, and since
pruning those costs the clean task the held-out rule prunes nothing; a few steps keep the
ranking (see tests/plugins/test_rnp.py).

Returns a `bench.Defended`: the pruned model, the values `pruned_neurons` and
`prune_threshold`, the series `prune_candidates`, `neuron_masks`, `pruned_neurons` (see
`anp`) and `unlearning` (accuracy and loss of each unlearning epoch on its training batches).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import bench
from bench.toolkit import epoch_order, random_crop_flip, to_model_input
from bench_plugins.defenses._neuron_masks import (
    PRUNING_METRICS,
    NeuronMasks,
    PruningOptions,
    choose_pruning,
    neuron_layers,
    pruning_result,
    split_held_out,
)

UNLEARNING_MOMENTUM = 0.9
UNLEARNING_WEIGHT_DECAY = 5e-4
UNLEARNING_MAX_GRAD_NORM = 20.0
MASK_MOMENTUM = 0.9


class Rnp(bench.Defense):
    name = "rnp"
    description = "Reconstructive Neuron Pruning: unlearn, recover neuron masks, prune the low-mask neurons"
    paper = "https://arxiv.org/abs/2305.14876"
    code = "https://github.com/bboylyg/RNP"
    defender_data = bench.DefenderData.BONAFIDE
    metrics = PRUNING_METRICS

    @dataclass(frozen=True)
    class Options(PruningOptions):
        clean_threshold: float = bench.option(
            0.2, "stop unlearning after an epoch whose training accuracy is at most this", min=0, max=1
        )
        unlearning_epochs: int = bench.option(20, "most unlearning epochs", min=1)
        unlearning_lr: float = bench.option(0.01, "unlearning SGD learning rate", min=0, min_exclusive=True)
        unlearning_milestones: list[int] = bench.option(
            [10, 20], "epochs at which the unlearning lr is multiplied by 0.1 (schedule)"
        )
        recovering_epochs: int = bench.option(20, "mask-recovering epochs", min=1)
        recovering_lr: float = bench.option(0.2, "mask SGD learning rate", min=0, min_exclusive=True)
        alpha: float = bench.option(
            0.2, "weight of the recovering loss (scales its gradient)", min=0, min_exclusive=True
        )

        unlearning_samples_per_epoch: int = bench.option(
            0,
            "samples per unlearning epoch, after each of which the stopping rule is checked; "
            "0: one pass over the bonafide images (the references' epoch)",
            min=0,
        )
        samples_per_epoch: int = bench.option(
            500,
            "samples per recovering epoch, the bonafide images repeated to fill it "
            "(the references' 500-image defense set); 0: one pass over them",
            min=0,
        )
        batch_size: int = bench.option(128, "images per step (the authors' 128)", min=1)

        def __post_init__(self):
            if any(m < 1 for m in self.unlearning_milestones) or self.unlearning_milestones != sorted(
                self.unlearning_milestones
            ):
                raise ValueError(
                    f"unlearning_milestones {self.unlearning_milestones} must be epochs (1 or more) in increasing order"
                )

    def check_model(self, model, sample):
        neuron_layers(model)

    def apply(self, model, bonafide, ctx):
        learn_on, held_out = split_held_out(bonafide, self.options.held_out_share, ctx.generator("rnp_held_out"), "rnp")
        unlearned, history = unlearn(model, learn_on, ctx, self.options)
        masks = recover_masks(unlearned, learn_on, ctx, self.options)
        choice = choose_pruning(model, masks, held_out, ctx, self.options)
        return pruning_result(model, masks, choice, {"unlearning": history})


def _batches(data: bench.ImageData, ctx: bench.DefenseContext, samples: int, batch_size: int, generator):
    """One epoch of `samples` (see `epoch_order`) as (float images, labels) batches, augmented
    when the model's recipe augments."""
    order = epoch_order(len(data), samples, generator, ctx.device)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        xb = data.x[idx]
        if ctx.recipe.augment:
            xb = random_crop_flip(xb, ctx.recipe.crop_padding, ctx.horizontal_flip, generator)
        yield to_model_input(xb), data.y[idx]


def unlearn(
    model: nn.Module, data: bench.ImageData, ctx: bench.DefenseContext, options: Rnp.Options
) -> tuple[nn.Module, list[dict]]:
    """A copy of `model` after gradient ascent on `data` until an epoch's training accuracy is
    at most `clean_threshold` (or `unlearning_epochs` ran); and per epoch its accuracy and loss."""
    o = options
    net = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(
        net.parameters(), lr=o.unlearning_lr, momentum=UNLEARNING_MOMENTUM, weight_decay=UNLEARNING_WEIGHT_DECAY
    )
    generator = ctx.generator("rnp_unlearn")
    history = []
    for epoch in ctx.progress(range(o.unlearning_epochs), desc="rnp: unlearn"):
        lr = o.unlearning_lr * 0.1 ** sum(epoch >= m for m in o.unlearning_milestones)
        for group in optimizer.param_groups:
            group["lr"] = lr
        correct = torch.zeros((), device=ctx.device)
        loss_sum = torch.zeros((), device=ctx.device)
        seen = 0
        for inputs, labels in _batches(data, ctx, o.unlearning_samples_per_epoch, o.batch_size, generator):
            with ctx.autocast():
                logits = net(inputs)
            loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            (-loss).backward()
            nn.utils.clip_grad_norm_(net.parameters(), UNLEARNING_MAX_GRAD_NORM)
            optimizer.step()
            correct += (logits.argmax(1) == labels).sum()
            loss_sum += loss.detach() * len(labels)
            seen += len(labels)
        accuracy = correct.item() / seen  # one sync per epoch
        history.append({"epoch": epoch + 1, "lr": lr, "train_acc": accuracy, "loss": loss_sum.item() / seen})
        if accuracy <= o.clean_threshold:
            break
    return net, history


def recover_masks(
    unlearned: nn.Module, data: bench.ImageData, ctx: bench.DefenseContext, options: Rnp.Options
) -> torch.Tensor:
    """RNP's masks (one per neuron, flat in `neuron_layers` order) learned on the frozen
    `unlearned` model (train mode) to minimise alpha * CE on `data`."""
    o = options
    net = unlearned.requires_grad_(False).train()
    masks = NeuronMasks([m for _, m in neuron_layers(net)], ctx.device)
    masks.mask.requires_grad_(True)
    optimizer = torch.optim.SGD([masks.mask], lr=o.recovering_lr, momentum=MASK_MOMENTUM)
    generator = ctx.generator("rnp_recover")
    with masks:
        for _ in ctx.progress(range(o.recovering_epochs), desc="rnp: recover"):
            for inputs, labels in _batches(data, ctx, o.samples_per_epoch, o.batch_size, generator):
                with ctx.autocast():
                    logits = net(inputs)
                loss = o.alpha * F.cross_entropy(logits.float(), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    masks.mask.clamp_(0.0, 1.0)
    return masks.mask.detach()


@bench.hookimpl
def register_defenses(register):
    register(Rnp)
