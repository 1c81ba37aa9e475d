"""`mcr`: mode-connectivity repair (Zhao, Chen, Das, Ramamurthy & Lin, ICLR 2020).

Two tampered models w0 and w1 are joined by a curve phi(t) in weight space whose bend theta is
trained on the bonafide set only; models in the middle of the curve keep clean accuracy while
the tampering fades. The training follows the reference code (IBM/model-sanitization, built on
Garipov et al.'s dnn-mode-connectivity): a 3-bend quadratic Bezier curve (or a polygonal chain),
theta starting at (w0 + w1) / 2, one t ~ U(0, 1) per minibatch, cross-entropy plus an explicit
0.5 * wd * ||phi(t)||^2 (optimizer weight decay 0), SGD lr 0.01 with momentum 0.9, batch 128,
100 epochs, lr constant for half of training then linearly down to 1% by 90%.

Batch-norm running statistics are not part of the curve: at every evaluated t they are reset
and recomputed from the bonafide set (the reference used the full training set, which a
defender does not have). The returned model is the point at `t`; the pipeline also measures
`path_points` evenly spaced points, built one at a time when it asks for them.

Choosing t: the paper reads it off the path plot, and BackdoorBench evaluates t = 0.1..0.9
without fixing one; neither has a default. 0.5 is the project's: the point farthest from both
tampered endpoints, in the middle of the 0.3..0.7 band where the paper's attack success rate
collapses. `clean_rule` picks t from bonafide accuracy alone instead (see `_clean_rule`).

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
from bench.errors import BenchError
from bench.evaluation import clean_accuracy, to_model_input
from bench.training import random_crop_flip, train_classifier


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
        return (1 - t) ** 2, 2 * t * (1 - t), t ** 2
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
                raise BenchError(f"mcr: the two endpoint models differ at parameter '{name}'; "
                                 "both must have the same architecture")
            # outermost dimension first; among equal strides a size-1 dimension goes inside
            order = sorted(range(p.dim()), key=lambda d: (-p.stride(d), p.shape[d] == 1, d))
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
        return {name: chunk.view(stored_shape).permute(inverse)
                for name, chunk, (stored_shape, inverse) in zip(self.names, chunks, self.layouts)}

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
            batch = bonafide.x[start:start + ctx.eval_batch_size]
            for m in norms:
                m.momentum = len(batch) / (seen + len(batch))
            net(to_model_input(batch))
            seen += len(batch)
    for m, momentum in zip(norms, saved_momenta):
        m.momentum = momentum
    net.eval()


def reference_lr_factor(epoch: int, epochs: int) -> float:
    """dnn-mode-connectivity's schedule: 1 for the first half, linear down to 0.01 by 90%."""
    progress = epoch / epochs
    if progress <= 0.5:
        return 1.0
    if progress <= 0.9:
        return 1.0 - (progress - 0.5) / 0.4 * 0.99
    return 0.01


class PathModel(nn.Module):
    """The network at the chosen t (weights phi(t), batch-norm statistics from the bonafide
    set). `points_to_evaluate()` builds the path points one at a time for the pipeline."""

    def __init__(self, net: nn.Module, curve: ParameterCurve, t: float, path_ts: list[float],
                 bonafide: bench.ImageData, ctx: bench.DefenseContext, series: dict):
        super().__init__()
        self.net = net
        self.curve, self.t, self.path_ts = curve, t, path_ts
        self.series = series
        self._bonafide, self._ctx = bonafide, ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def point(self, t: float) -> nn.Module:
        """A fresh network at `t`, with batch-norm statistics recomputed on the bonafide set."""
        net = copy.deepcopy(self.net)
        self.curve.load_into(net, t)
        recompute_batchnorm(net, self._bonafide, self._ctx)
        return net

    def points_to_evaluate(self):
        for t in self.path_ts:
            yield "path", {"t": t}, self.point(t)


class ModeConnectivityRepair(bench.Defense):
    name = "mcr"
    description = "Mode-connectivity repair: train a curve between two tampered models on bonafide data"

    @dataclass(frozen=True)
    class Options:
        curve: Curve = bench.option(Curve.BEZIER, "curve shape: 3-bend quadratic Bezier (paper) or polygonal chain")
        endpoint: Endpoint = bench.option(
            Endpoint.SECOND_SEED, "second endpoint: the same attack trained with seed + seed_offset (paper), "
            "or the attacked model fine-tuned on the bonafide set (BackdoorBench)")
        seed_offset: int = bench.option(1, "second_seed: the second model's seed is the job seed plus this", min=1)
        finetune_epochs: int = bench.option(100, "finetuned: epochs of fine-tuning (BackdoorBench ft_epochs)", min=1)
        finetune_lr: float = bench.option(0.01, "finetuned: fine-tuning lr (BackdoorBench ft_lr)", min=0,
                                          min_exclusive=True)
        t: float = bench.option(0.5, "point of the curve returned (fixed t_selection)", min=0, max=1)
        t_selection: TSelection = bench.option(
            TSelection.FIXED, "fixed: use t; clean_rule: the path point farthest from both endpoints whose "
            "bonafide accuracy is within max_accuracy_drop of the worse endpoint")
        max_accuracy_drop: float = bench.option(0.02, "clean_rule: bonafide accuracy a point may lose", min=0, max=1)
        epochs: int = bench.option(100, "passes over the bonafide set to train the bend", min=1)
        lr: float = bench.option(0.01, "initial learning rate (SGD)", min=0, min_exclusive=True)
        momentum: float = bench.option(0.9, "SGD momentum", min=0, max=1)
        weight_decay: float = bench.option(1e-4, "explicit L2 term 0.5 * wd * ||phi(t)||^2", min=0)
        batch_size: int = bench.option(128, "images per step, each with its own t", min=1)
        path_points: int = bench.option(11, "evenly spaced points t = 0..1 measured along the path", min=2)
        augment: bool = bench.option(True, "random crop (and flip where valid) while training the bend, "
                                           "when the model's recipe augments")

    def apply(self, model, bonafide, ctx):
        o = self.options
        curve = ParameterCurve(model, self._second_endpoint(model, bonafide, ctx), o.curve)
        losses = self._train(model, curve, bonafide, ctx)
        path_ts = [round(i / (o.path_points - 1), 6) for i in range(o.path_points)]
        series = {"mcr_training": [{"epoch": i + 1, "loss": loss} for i, loss in enumerate(losses)]}
        repaired = PathModel(model, curve, o.t, path_ts, bonafide, ctx, series)
        if o.t_selection is TSelection.CLEAN_RULE:
            repaired.t = self._clean_rule(repaired, bonafide, ctx)
        series["mcr_t"] = [{"t": repaired.t}]
        curve.load_into(model, repaired.t)
        recompute_batchnorm(model, bonafide, ctx)
        return repaired

    def _second_endpoint(self, model: nn.Module, bonafide: bench.ImageData, ctx: bench.DefenseContext) -> nn.Module:
        o = self.options
        if o.endpoint is Endpoint.SECOND_SEED:
            if ctx.attacked_model_with_seed is None:
                raise BenchError("mcr: endpoint 'second_seed' needs a second attacked model, and this run "
                                 "provides none; set endpoint = 'finetuned'")
            return ctx.attacked_model_with_seed(ctx.seed + o.seed_offset)
        tuned = copy.deepcopy(model)
        recipe = dataclasses.replace(ctx.recipe, epochs=o.finetune_epochs, lr=o.finetune_lr, batch_size=o.batch_size,
                                     weight_decay=5e-4, warmup_fraction=0.0, augment=o.augment and ctx.recipe.augment)
        train_classifier(tuned, bonafide, recipe, ctx, flip=ctx.horizontal_flip, stream="mcr_finetune",
                         desc="mcr: fine-tune endpoint")
        return tuned

    def _train(self, net: nn.Module, curve: ParameterCurve, bonafide: bench.ImageData,
               ctx: bench.DefenseContext) -> list[float]:
        """Train the bend; returns the mean loss (cross-entropy + L2) of each epoch, read from the
        device once at the end."""
        o = self.options
        generator = ctx.generator("mcr")
        optimizer = torch.optim.SGD([curve.bend], lr=o.lr, momentum=o.momentum, weight_decay=0.0)
        steps_per_epoch = math.ceil(len(bonafide) / o.batch_size)
        ts = torch.rand(o.epochs * steps_per_epoch, device=ctx.device, generator=generator)
        loss_sums = torch.zeros(o.epochs, device=ctx.device)
        augment = o.augment and ctx.recipe.augment
        net.train()
        step = 0
        for epoch in ctx.progress(range(o.epochs), desc="mcr: train curve"):
            optimizer.param_groups[0]["lr"] = o.lr * reference_lr_factor(epoch, o.epochs)
            order = torch.randperm(len(bonafide), device=ctx.device, generator=generator)
            for start in range(0, len(bonafide), o.batch_size):
                idx = order[start:start + o.batch_size]
                images = bonafide.x[idx]
                if augment:
                    images = random_crop_flip(images, ctx.recipe.crop_padding, ctx.horizontal_flip, generator)
                weights = curve.weights(ts[step])
                with ctx.autocast():
                    logits = functional_call(net, curve.as_parameters(weights), (to_model_input(images),))
                loss = F.cross_entropy(logits.float(), bonafide.y[idx]) + 0.5 * o.weight_decay * weights.square().sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sums[epoch] += loss.detach() * len(idx)
                step += 1
        curve.bend.requires_grad_(False)
        net.eval()
        return (loss_sums / len(bonafide)).tolist()

    def _clean_rule(self, repaired: PathModel, bonafide: bench.ImageData, ctx: bench.DefenseContext) -> float:
        """The path point farthest from both endpoints whose bonafide accuracy is at most
        `max_accuracy_drop` below the worse endpoint's. It uses clean data only (the defender
        knows no trigger), measured on the images the curve was trained on, so it guards clean
        accuracy; that the backdoor is gone there is the paper's observation, not checked."""
        accuracies = {t: clean_accuracy(repaired.point(t), bonafide, ctx) for t in repaired.path_ts}
        repaired.series["mcr_path_bonafide"] = [{"t": t, "bonafide_acc": a} for t, a in accuracies.items()]
        floor = min(accuracies[0.0], accuracies[1.0]) - self.options.max_accuracy_drop
        eligible = [t for t, acc in accuracies.items() if acc >= floor]
        return max(eligible, key=lambda t: (min(t, 1 - t), accuracies[t]))


@bench.hookimpl
def register_defenses(register):
    register(ModeConnectivityRepair)
