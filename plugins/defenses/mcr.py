"""`mcr`: mode-connectivity repair (Zhao, Chen, Das, Ramamurthy & Lin, ICLR 2020).

Two tampered models w0 and w1 are joined by a curve phi(t) in weight space whose bend theta is
trained on the bonafide set only; models in the middle of the curve keep clean accuracy while
the tampering fades. The training follows the reference code (IBM/model-sanitization, built on
Garipov et al.'s dnn-mode-connectivity): a 3-bend quadratic Bezier curve (or a polygonal chain),
theta starting at (w0 + w1) / 2, one t ~ U(0, 1) per minibatch, cross-entropy plus an explicit
0.5 * wd * ||phi(t)||^2 (optimizer weight decay 0), SGD lr 0.01 with momentum 0.9, batch 128,
100 epochs, lr constant for half of training then linearly down to 1% by 90%, no augmentation
(the reference loads the bonafide images with the test transform). An epoch is 10,000 samples:
the reference's loader repeats the N bonafide images to fill it, so the curve gets about 7,900
steps whatever N is (`samples_per_epoch`).

Batch-norm running statistics are not part of the curve: at every evaluated t they are reset
and recomputed from the bonafide set (the reference used the full training set, which a
defender does not have). The returned model is the point at `t`; the pipeline also measures
`path_points` evenly spaced points, built one at a time when it asks for them.

Choosing t: the paper reads it off the path plot, and BackdoorBench evaluates t = 0.1..0.9
without fixing one; a defender who does not know the trigger can only use clean data. The
default `clean_rule` holds out `holdout_fraction` of the bonafide images from curve training,
measures every path point on them, and returns the point farthest from both endpoints whose
held-out accuracy is not significantly below the better endpoint's: a one-sided exact McNemar
test on the same held-out images at `significance` (0.05). A fixed tolerance cannot work here:
with 100 bonafide images 20 are held out, so a 2-point tolerance is 0.4 of an image; the test
says what the held-out set can resolve (with 20 images, little). Every point's held-out
accuracy and p-value are stored (series `mcr_path_held_out`) beside the test-set path. Scored
on the images the bend was trained on, every mid-path point fits them and the rule would always
return t = 0.5, where clean accuracy on unseen images dips most. `fixed` returns `t` (studies).

The curve is generic over any network: w0, theta and w1 are three flat vectors laid out in each
parameter's own memory order (channels_last included), so phi(t) is one fused expression, one
`split` gives every parameter its view, and `torch.func.functional_call` runs the network on it.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import bench
from bench import BenchError
from bench.toolkit import predict, to_model_input
from bench.toolkit import (
    REFERENCE_SAMPLES_PER_EPOCH,
    epoch_order,
    random_crop_flip,
    reference_lr_factor,
    steps_per_epoch,
    train_classifier,
)


class Curve(enum.Enum):
    BEZIER = "bezier"  # phi(t) = (1-t)^2 w0 + 2t(1-t) theta + t^2 w1
    POLYCHAIN = "polychain"  # w0 -> theta on [0, 1/2], theta -> w1 on [1/2, 1], linearly


class Endpoint(enum.Enum):
    SECOND_SEED = "second_seed"  # the paper: another model attacked the same way, another seed
    FINETUNED = "finetuned"  # BackdoorBench: the attacked model fine-tuned on the bonafide set


class TSelection(enum.Enum):
    FIXED = "fixed"
    CLEAN_RULE = "clean_rule"


def curve_coefficients(curve: Curve, t):
    """The weights of (w0, theta, w1) at `t`, a float or a 0-dim tensor on the device (so that
    training draws t without a host sync)."""
    if curve is Curve.BEZIER:
        return (1 - t) ** 2, 2 * t * (1 - t), t**2
    s = 2 * t
    if isinstance(t, torch.Tensor):
        return (1 - s).clamp(min=0), 1 - (1 - s).abs(), (s - 1).clamp(min=0)
    return max(0.0, 1 - s), 1 - abs(1 - s), max(0.0, s - 1)


class ParameterCurve:
    """phi(t) over every parameter of a network, between the parameters of `start` and `end`
    (same architecture), with a trainable bend initialised at their midpoint."""

    def __init__(self, start: nn.Module, end: nn.Module, curve: Curve):
        end_params = dict(end.named_parameters())
        self.curve = curve
        self.names, self.numels, self.layouts = [], [], []
        start_flat, end_flat = [], []
        for name, p in start.named_parameters():
            other = end_params.get(name)
            if other is None or other.shape != p.shape:
                raise BenchError(
                    f"mcr: the two endpoint models differ at parameter '{name}'; both must have the same architecture"
                )
            # outermost dimension first; among equal strides a size-1 dimension goes inside
            order = sorted(range(p.dim()), key=lambda d: (-p.stride()[d], p.shape[d] == 1, d))
            if not p.permute(order).is_contiguous():
                order = list(range(p.dim()))
            self.names.append(name)
            self.numels.append(p.numel())
            self.layouts.append(([p.shape[d] for d in order], [order.index(d) for d in range(p.dim())]))
            start_flat.append(p.detach().permute(order).reshape(-1))
            end_flat.append(other.detach().to(p.device).permute(order).reshape(-1))
        self.start = torch.cat(start_flat).float()
        self.end = torch.cat(end_flat).float()
        self.bend = ((self.start + self.end) / 2).requires_grad_(True)

    def weights(self, t) -> torch.Tensor:
        """phi(t) as one flat vector (differentiable with respect to the bend)."""
        c_start, c_bend, c_end = curve_coefficients(self.curve, t)
        return self.start * c_start + self.bend * c_bend + self.end * c_end

    def as_parameters(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of a flat vector shaped (and strided) like the network's parameters."""
        chunks = torch.split(flat, self.numels)
        return {
            name: chunk.view(stored_shape).permute(inverse)
            for name, chunk, (stored_shape, inverse) in zip(self.names, chunks, self.layouts)
        }

    @torch.no_grad()
    def load_into(self, net: nn.Module, t: float) -> None:
        """Copy phi(t) into the parameters of `net` (in place)."""
        params = dict(net.named_parameters())
        for name, value in self.as_parameters(self.weights(t)).items():
            params[name].copy_(value)


@torch.no_grad()
def recompute_batchnorm(net: nn.Module, bonafide: bench.ImageData, ctx: bench.RunContext) -> None:
    """Reset every batch-norm layer's running statistics and re-estimate them from the bonafide
    images alone: train-mode passes, each batch weighted by its size, so the running mean is the
    mean over all bonafide images (dnn-mode-connectivity's `update_bn`; with equal batches this
    is momentum=None's cumulative average). Leaves `net` in eval mode."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved_momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
    net.train()
    seen = 0
    with ctx.autocast():
        for start in range(0, len(bonafide), ctx.eval_batch_size):
            batch = bonafide.x[start : start + ctx.eval_batch_size]
            for m in norms:
                m.momentum = len(batch) / (seen + len(batch))
            net(to_model_input(batch))
            seen += len(batch)
    for m, momentum in zip(norms, saved_momenta):
        m.momentum = momentum
    net.eval()


def curve_point(
    net: nn.Module, curve: ParameterCurve, t: float, bn_images: bench.ImageData, ctx: bench.RunContext
) -> nn.Module:
    """A fresh copy of `net` at `t`, with batch-norm statistics recomputed on `bn_images`."""
    point = copy.deepcopy(net)
    curve.load_into(point, t)
    recompute_batchnorm(point, bn_images, ctx)
    return point


def paired_worse_p_value(reference_correct: torch.Tensor, point_correct: torch.Tensor) -> float:
    """One-sided exact McNemar test on the same images: the probability, were the point as
    accurate as the reference, of it losing at least as many of the images they disagree on as
    it did (binomial with p = 1/2 over the discordant images)."""
    worse = int((reference_correct & ~point_correct).sum())
    discordant = worse + int((~reference_correct & point_correct).sum())
    return sum(math.comb(discordant, k) for k in range(worse, discordant + 1)) / 2**discordant


def farthest_acceptable_t(correct: dict[float, torch.Tensor], significance: float) -> tuple[float, dict[float, float]]:
    """The t farthest from both endpoints (0 and 1) whose held-out accuracy is not significantly
    below the better endpoint's (one-sided exact McNemar test at `significance` on the same
    held-out images, `correct` holding each point's per-image correctness); among equally far
    points, the more accurate one. Returns (t, each point's p-value)."""
    accuracy = {t: float(c.float().mean()) for t, c in correct.items()}
    reference = correct[0.0] if accuracy[0.0] >= accuracy[1.0] else correct[1.0]
    p_values = {t: paired_worse_p_value(reference, c) for t, c in correct.items()}
    eligible = [t for t in correct if p_values[t] >= significance]
    chosen = max(eligible, key=lambda t: (round(min(t, 1 - t), 9), accuracy[t], -t))
    return chosen, p_values


def train_curve(
    net: nn.Module,
    curve: ParameterCurve,
    data: bench.ImageData,
    ctx: bench.RunContext,
    *,
    epochs: int,
    samples_per_epoch: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    batch_size: int,
    augment: bool = False,
    crop_padding: int = 0,
    stream: str = "mcr",
    desc: str = "train curve",
) -> list[float]:
    """Train the curve's bend on `data` as the reference does: one t ~ U(0, 1) per minibatch,
    cross-entropy plus 0.5 * weight_decay * ||phi(t)||^2, SGD with momentum, the reference's
    per-epoch lr schedule. Returns the mean loss of each epoch, read from the device once at
    the end. Also used by the `robust_path` analysis."""
    generator = ctx.generator(stream)
    optimizer = torch.optim.SGD([curve.bend], lr=lr, momentum=momentum, weight_decay=0.0)
    steps = steps_per_epoch(len(data), batch_size, samples_per_epoch)
    ts = torch.rand(epochs * steps, device=ctx.device, generator=generator)
    loss_sums = torch.zeros(epochs, device=ctx.device)
    net.train()
    step = 0
    for epoch in ctx.progress(range(epochs), desc=desc):
        optimizer.param_groups[0]["lr"] = lr * reference_lr_factor(epoch, epochs)
        order = epoch_order(len(data), samples_per_epoch, generator, ctx.device)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            images = data.x[idx]
            if augment:
                images = random_crop_flip(images, crop_padding, ctx.horizontal_flip, generator)
            weights = curve.weights(ts[step])
            with ctx.autocast():
                logits = functional_call(net, curve.as_parameters(weights), (to_model_input(images),))
            loss = F.cross_entropy(logits.float(), data.y[idx]) + 0.5 * weight_decay * weights.square().sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sums[epoch] += loss.detach() * len(idx)
            step += 1
    curve.bend.requires_grad_(False)
    net.eval()
    return (loss_sums / len(order)).tolist()


@dataclass(frozen=True)
class SecondEndpointOptions:
    """The options that choose the model MCR joins the attacked one to; `weight_average_finetune`
    (MCR's control) takes the same ones, so both start from the same two models."""

    endpoint: Endpoint = bench.option(
        Endpoint.SECOND_SEED,
        "second endpoint: the same attack trained with seed + seed_offset (paper), "
        "or the attacked model fine-tuned on the bonafide set (BackdoorBench)",
    )
    seed_offset: int = bench.option(1, "second_seed: the second model's seed is the job seed plus this", min=1)
    finetune_epochs: int = bench.option(
        100, "finetuned: epochs of fine-tuning, of samples_per_epoch samples (BackdoorBench ft_epochs)", min=1
    )
    finetune_lr: float = bench.option(
        0.01, "finetuned: fine-tuning lr (BackdoorBench ft_lr)", min=0, min_exclusive=True
    )


def second_endpoint(model: nn.Module, bonafide: bench.ImageData, ctx: bench.DefenseContext, options, *, name: str):
    """The model MCR joins the attacked `model` to, as `options` say (`endpoint`, `seed_offset`,
    and for `finetuned`: `finetune_epochs`, `finetune_lr`, `batch_size`, `samples_per_epoch`,
    `augment`). Shared with `weight_average_finetune`, MCR's control, so both start from the
    same two models."""
    o = options
    if o.endpoint is Endpoint.SECOND_SEED:
        if ctx.attacked_model_with_seed is None:
            raise BenchError(
                f"{name}: endpoint 'second_seed' needs a second attacked model, and this run "
                "provides none; set endpoint = 'finetuned'"
            )
        return ctx.attacked_model_with_seed(ctx.seed + o.seed_offset)
    tuned = copy.deepcopy(model)
    recipe = dataclasses.replace(
        ctx.recipe,
        epochs=o.finetune_epochs,
        lr=o.finetune_lr,
        batch_size=o.batch_size,
        weight_decay=5e-4,
        warmup_fraction=0.0,
        augment=o.augment and ctx.recipe.augment,
    )
    train_classifier(
        tuned,
        bonafide,
        recipe,
        ctx,
        flip=ctx.horizontal_flip,
        stream="mcr_finetune",
        desc=f"{name}: fine-tune endpoint",
        samples_per_epoch=o.samples_per_epoch,
    )
    return tuned


class ModeConnectivityRepair(bench.Defense):
    name = "mcr"
    description = "Mode-connectivity repair: train a curve between two tampered models on bonafide data"
    paper = "https://openreview.net/forum?id=SJgwzCEKwH"
    code = "https://github.com/IBM/model-sanitization"

    @dataclass(frozen=True)
    class Options(SecondEndpointOptions):
        curve: Curve = bench.option(Curve.BEZIER, "curve shape: 3-bend quadratic Bezier (paper) or polygonal chain")
        t_selection: TSelection = bench.option(
            TSelection.CLEAN_RULE,
            "clean_rule: the path point farthest from both endpoints whose accuracy on held-out "
            "bonafide images is not significantly below the better endpoint's; fixed: use t (trains on every image)",
        )
        t: float = bench.option(0.5, "point of the curve returned with t_selection = 'fixed'", min=0, max=1)
        holdout_fraction: float = bench.option(
            0.2,
            "clean_rule: share of the bonafide images kept out of curve training to score the path points on",
            min=0,
            max=0.9,
            min_exclusive=True,
        )
        significance: float = bench.option(
            0.05,
            "clean_rule: a point is rejected when its held-out accuracy is below the better endpoint's at "
            "this one-sided level (exact McNemar test on the held-out images)",
            min=0,
            max=1,
            min_exclusive=True,
        )
        epochs: int = bench.option(100, "epochs of samples_per_epoch samples to train the bend", min=1)
        samples_per_epoch: int = bench.option(
            REFERENCE_SAMPLES_PER_EPOCH,
            "samples per epoch: the bonafide images are repeated to fill it, so the "
            "budget is the same for every bonafide size (reference: 10,000); 0: one pass over them",
            min=0,
        )
        lr: float = bench.option(0.01, "initial learning rate (SGD)", min=0, min_exclusive=True)
        momentum: float = bench.option(0.9, "SGD momentum", min=0, max=1)
        weight_decay: float = bench.option(1e-4, "explicit L2 term 0.5 * wd * ||phi(t)||^2", min=0)
        batch_size: int = bench.option(128, "images per step, each with its own t", min=1)
        path_points: int = bench.option(11, "evenly spaced points t = 0..1 measured along the path", min=2)
        augment: bool = bench.option(
            False,
            "random crop (and flip where valid) while training the bend, when the "
            "model's recipe augments; the reference trains without augmentation",
        )

    metrics = (
        bench.Metric(
            "mcr_t",
            "t",
            higher_is_better=None,
            kind=bench.MetricKind.NUMBER,
            doc="the point of the path MCR returned (chosen on held-out bonafide images: with the default clean "
            "rule its curve trains on 80% of them, the rest choose t; a fixed t trains on all)",
        ),
    )

    def other_attacked_seeds(self, seed):
        return (seed + self.options.seed_offset,) if self.options.endpoint is Endpoint.SECOND_SEED else ()

    def apply(self, model, bonafide, ctx):
        o = self.options
        training, held_out = self._split(bonafide, ctx)
        # a `finetuned` endpoint learns from the curve's images only: the held-out ones choose t
        curve = ParameterCurve(model, second_endpoint(model, training, ctx, o, name=self.name), o.curve)
        losses = self._train(model, curve, training, ctx)
        path_ts = [round(i / (o.path_points - 1), 6) for i in range(o.path_points)]
        series = {"mcr_training": [{"epoch": i + 1, "loss": loss} for i, loss in enumerate(losses)]}
        t = o.t
        if held_out is not None:
            correct = {
                s: predict(curve_point(model, curve, s, training, ctx), held_out.x, ctx) == held_out.y for s in path_ts
            }
            t, p_values = farthest_acceptable_t(correct, o.significance)
            series["mcr_path_held_out"] = [
                {
                    "t": s,
                    "held_out_acc": float(c.float().mean()),
                    "p_value_below_better_endpoint": p_values[s],
                    "acceptable": float(p_values[s] >= o.significance),
                }
                for s, c in correct.items()
            ]
        repaired = curve_point(model, curve, t, training, ctx)

        def points():
            for s in path_ts:
                yield "path", {"t": s}, curve_point(model, curve, s, training, ctx)

        return bench.Defended(repaired, series=series, values={"mcr_t": t}, points=points)

    def _split(
        self, bonafide: bench.ImageData, ctx: bench.DefenseContext
    ) -> tuple[bench.ImageData, bench.ImageData | None]:
        """(images the curve trains on, held-out images that score the path points, or None for
        a fixed t). At least one image on each side."""
        o = self.options
        if o.t_selection is TSelection.FIXED:
            return bonafide, None
        if len(bonafide) < 2:
            raise BenchError(
                "mcr: t_selection 'clean_rule' needs at least 2 bonafide images to hold some out; "
                "raise bonafide_size or set t_selection = 'fixed'"
            )
        held = min(len(bonafide) - 1, max(1, round(o.holdout_fraction * len(bonafide))))
        order = torch.randperm(len(bonafide), device=bonafide.y.device, generator=ctx.generator("mcr_holdout"))
        return bonafide.subset(order[held:]), bonafide.subset(order[:held])

    def _train(
        self, net: nn.Module, curve: ParameterCurve, bonafide: bench.ImageData, ctx: bench.DefenseContext
    ) -> list[float]:
        o = self.options
        return train_curve(
            net,
            curve,
            bonafide,
            ctx,
            epochs=o.epochs,
            samples_per_epoch=o.samples_per_epoch,
            lr=o.lr,
            momentum=o.momentum,
            weight_decay=o.weight_decay,
            batch_size=o.batch_size,
            augment=o.augment and ctx.recipe.augment,
            crop_padding=ctx.recipe.crop_padding,
            desc="mcr: train curve",
        )


@bench.hookimpl
def register_defenses(register):
    register(ModeConnectivityRepair)
