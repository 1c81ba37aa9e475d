"""`anp`: Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021).

A backdoored network collapses (and predicts the target class) when its neurons are perturbed
adversarially, far more easily than a clean one; the neurons that make it so sensitive carry
the backdoor. ANP learns a mask m in [0, 1] per neuron (batch-norm channel; conv output
channel in a model without batch norm, see `_neuron_masks`) on bonafide images, under
adversarial neuron perturbations, and prunes the neurons with small masks:

1. hold out `held_out_share` of the bonafide images (seeded); masks learn on the rest;
2. each of `iterations` steps draws `batch_size` images with replacement (the references'
   `RandomSampler`), augmented with the model's training crop/flip when its recipe augments
   (the references use the training transform); draws the perturbations delta (on each
   neuron's weight part) and xi (on its bias) uniformly in [-eps, eps], takes `pgd_steps`
   signed-gradient ascent steps of size eps / pgd_steps on the cross-entropy, then makes one
   SGD step (momentum 0.9) on the masks on alpha * CE(clean) + (1 - alpha) * CE(perturbed)
   and clips them to [0, 1]. As in both references the network runs in train mode (batch-norm
   batch statistics) on a copy, so the attacked model's running statistics are untouched;
3. prune (zero the batch-norm gamma of) the neurons with the smallest masks in the attacked
   model, by the largest candidate whose held-out accuracy stays within `max_accuracy_drop` of
   the unpruned model's (`_neuron_masks.choose_pruning`).

Defaults: eps 0.4, alpha 0.2, 1 perturbation step, 2,000 iterations of batch 128, mask lr 0.2
with momentum 0.9: the authors' code (csdongxian/ANP_backdoor `optimize_mask_cifar.py`) and the
paper. BackdoorBench (`config/defense/anp/cifar10.yaml`) keeps eps, alpha, steps and the 2,000
iterations but runs the masks at its fine-tuning lr 0.01 with batch 256; we follow the authors.
The iteration budget is fixed, not tied to the bonafide size. As in the authors' code the
perturbation is not projected back to [-eps, eps] after its step. Candidates (BackdoorBench
`pruning_by` threshold, `pruning_step` 0.05, `pruning_max` 0.9): mask thresholds 0, 0.05, ...,
0.9, a neuron being pruned when its mask is below the threshold (the paper's wording; the code
prunes at or below it), ties in layer order (the code's stable sort). BackdoorBench keeps the
candidate with the lowest *test* ASR whose test accuracy drops by under 10% (its issue #35);
here no test image is read: the held-out bonafide images and the 10% relative drop
(`max_accuracy_drop`) decide.

Returns a `bench.Defended`: the pruned model, the values `pruned_neurons` and `prune_threshold`,
and the series `prune_candidates` (candidate -> neurons pruned, held-out accuracy, chosen),
`neuron_masks` (every neuron's learned mask; `layer` indexes `_neuron_masks.neuron_layers`) and
`pruned_neurons`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import bench
from bench.toolkit import random_crop_flip, to_model_input
from bench_plugins.defenses._neuron_masks import (
    PRUNING_METRICS,
    NeuronMasks,
    PruningOptions,
    choose_pruning,
    neuron_layers,
    pruning_result,
    split_held_out,
)


def learn_anp_masks(model: nn.Module, data: bench.ImageData, ctx: bench.DefenseContext, options: Anp.Options):
    """ANP's masks (one per neuron, flat in `neuron_layers` order, on the device) learned on
    `data` with a train-mode copy of `model`; `model` is not changed."""
    o = options
    net = copy.deepcopy(model).requires_grad_(False).train()
    masks = NeuronMasks([m for _, m in neuron_layers(net)], ctx.device)
    masks.mask.requires_grad_(True)
    optimizer = torch.optim.SGD([masks.mask], lr=o.lr, momentum=0.9)
    generator = ctx.generator("anp")
    augment = ctx.recipe.augment

    def loss_of(inputs, labels):
        with ctx.autocast():
            logits = net(inputs)
        return F.cross_entropy(logits.float(), labels)

    with masks:
        for _ in ctx.progress(range(o.iterations), desc="anp: masks"):
            idx = torch.randint(len(data), (o.batch_size,), device=ctx.device, generator=generator)
            xb = data.x[idx]
            if augment:
                xb = random_crop_flip(xb, ctx.recipe.crop_padding, ctx.horizontal_flip, generator)
            inputs, labels = to_model_input(xb), data.y[idx]
            if o.eps > 0:
                masks.perturbed = True
                _perturb(masks, lambda: loss_of(inputs, labels), o, generator)
                loss_perturbed = loss_of(inputs, labels)
                masks.perturbed = False
            else:
                loss_perturbed = torch.zeros((), device=ctx.device)
            loss = o.alpha * loss_of(inputs, labels) + (1 - o.alpha) * loss_perturbed
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                masks.mask.clamp_(0.0, 1.0)
    return masks.mask.detach()


def _perturb(masks: NeuronMasks, loss_fn, o: Anp.Options, generator: torch.Generator) -> None:
    """Draw delta and xi uniformly in [-eps, eps], then ascend the loss by signed-gradient steps
    of eps / pgd_steps (the authors' SGD on the negated loss with signed gradients)."""
    noises = [masks.noise, masks.noise_bias]
    for noise in noises:
        noise.copy_(torch.rand(noise.shape, device=noise.device, generator=generator) * 2 * o.eps - o.eps)
    for _ in range(o.pgd_steps):
        for noise in noises:
            noise.requires_grad_(True)
        grads = torch.autograd.grad(loss_fn(), noises)
        with torch.no_grad():
            for noise, grad in zip(noises, grads):
                noise.add_(grad.sign(), alpha=o.eps / o.pgd_steps)
        for noise in noises:
            noise.requires_grad_(False)


class Anp(bench.Defense):
    name = "anp"
    description = (
        "Adversarial Neuron Pruning: learn neuron masks under adversarial neuron perturbation, prune the lowest masks"
    )
    paper = "https://arxiv.org/abs/2110.14430"
    code = "https://github.com/csdongxian/ANP_backdoor"
    defender_data = bench.DefenderData.BONAFIDE
    metrics = PRUNING_METRICS

    @dataclass(frozen=True)
    class Options(PruningOptions):
        eps: float = bench.option(0.4, "bound of the neuron perturbations delta and xi (anp_eps)", min=0)
        alpha: float = bench.option(
            0.2, "weight of the clean loss; 1 - alpha weighs the perturbed loss (anp_alpha)", min=0, max=1
        )
        pgd_steps: int = bench.option(1, "signed-gradient steps of the perturbation per iteration (anp_steps)", min=1)
        iterations: int = bench.option(2000, "mask-learning iterations (nb_iter)", min=1)
        batch_size: int = bench.option(128, "images per iteration, drawn with replacement", min=1)
        lr: float = bench.option(
            0.2, "mask SGD learning rate, momentum 0.9 (the authors' 0.2)", min=0, min_exclusive=True
        )

    def check_model(self, model, sample):
        neuron_layers(model)

    def apply(self, model, bonafide, ctx):
        learn_on, held_out = split_held_out(bonafide, self.options.held_out_share, ctx.generator("anp_held_out"), "anp")
        masks = learn_anp_masks(model, learn_on, ctx, self.options)
        choice = choose_pruning(model, masks, held_out, ctx, self.options)
        return pruning_result(model, masks, choice)


@bench.hookimpl
def register_defenses(register):
    register(Anp)
