"""`neural_cleanse`: Neural Cleanse (Wang, Yao, Shan, Li, Viswanath, Zheng & Zhao, IEEE S&P 2019).

A backdoor target class is one that a tiny trigger sends every image to. For each class k the
defense reverse-engineers the smallest trigger that does so, then calls a class whose trigger is
abnormally small a backdoor target, and unlearns that trigger.

1. Reverse engineering, on the bonafide images only: a mask m in [0, 1]^(HxW) (shared by the
   colour channels) and a pattern p in [0, 1]^(CxHxW), each the image of an unbounded
   parameter through tanh (m = tanh(w) / 2 + 1/2), stamp x' = (1 - m) * x + m * p in the
   [0, 1] image space the model takes, and Adam (lr 0.1, betas 0.5 and 0.9, as both
   references) minimises CE(f(x'), k) + cost_k * |m|_1. The cost follows the reference's
   schedule, per epoch: it starts at `init_cost` 1e-3; after `patience` (5) epochs in a row in
   which the stamped images go to k at least `attack_success_threshold` of the time (BackdoorBench
   98%, the paper's code 99%) it is multiplied by `cost_multiplier` (2), after 5 in a row below
   it divided by 2^1.5. The kept trigger is the last one of an epoch that succeeded with a
   smaller mean |m|_1 than any before (the last one if none succeeded); a class stops early once
   its cost has gone both up and down and its best |m|_1 has not improved by 1% for 25 epochs.
   All classes are optimised together, `classes_per_pass` at a time, on the same images: one
   forward pass of classes x batch images per step, each class with its own cost and state.
2. Detection: the anomaly index of class k is |L1_k - median| / (1.4826 * MAD) over the
   classes' mask norms (the paper's consistency constant; the median of an even count is the
   mean of the two middle values, as the paper's numpy code); a class with a mask smaller than
   the median and an anomaly index over `anomaly_threshold` (2) is flagged.
3. Mitigation: nothing flagged, the model is returned unchanged. Otherwise, as BackdoorBench's
   `nc` implements the paper's unlearning, a random `unlearning_ratio` (20%) of the bonafide
   images is replaced by copies stamped with each flagged class's reversed trigger (one copy
   per flagged class), all under their true labels, and the model is fine-tuned on that set.

Defaults and sources (BackdoorBench `config/defense/nc/cifar10.yaml`, `defense/nc.py`; the
paper's code, bolunwang/backdoor `visualizer.py` and `gtsrb_visualize_example.py`):
mask_lr 0.1, init_cost 1e-3, cost_multiplier 2, patience 5, early stop 0.99 / 25 epochs,
attack_success_threshold 0.98, 80 reverse-engineering epochs (nc_epoch) of batches of 256; an
epoch is 2,500 samples (BackdoorBench's epoch: one pass over its 2,500 bonafide CIFAR-10
images), the bonafide images repeated to fill it, so the budget does not shrink with the
bonafide size. Unlearning follows BackdoorBench (epochs 100, SGD lr 0.01 with plain momentum
0.9, weight decay 5e-4, batch 256, per-epoch cosine annealing); an epoch is 2,500 samples,
BackdoorBench's budget (100 passes over its 2,500 images), the unlearning set repeated to fill
it. The paper itself unlearns for one epoch on 10% of the training set.

Deviations: BackdoorBench saves the reversed mask and trigger as min-max normalised PNGs and
stamps those; here the optimised mask and pattern are stamped as they are (then rounded to
uint8). The mask and pattern start uniformly random (the paper's code; BackdoorBench starts
them at 0.88), and the cost starts at `init_cost` (BackdoorBench; the paper's code starts at 0).
The reverse engineering does not augment (the paper's code; BackdoorBench crops and flips);
unlearning does not augment by default, as `finetune` and `fine_pruning`. Every choice here
uses the bonafide images only: no test data, no knowledge of the attack.

Returns a `bench.Defended` with the values `flagged_classes` (how many) and `anomaly_index`
(the largest anomaly index among classes with a mask below the median), and the series
`neural_cleanse_classes`: per class its mask L1 norm, anomaly index, whether it was flagged
and the share of the bonafide images its reversed trigger sends to it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import bench
from bench.toolkit import epoch_order, to_model_input, train_classifier

MAD_CONSISTENCY = 1.4826  # MAD to standard deviation under a normal distribution (the paper)
BACKDOORBENCH_BONAFIDE = 2_500  # BackdoorBench's defender set: 5% of CIFAR-10's training images


@dataclass
class ReversedTriggers:
    """Per class: the reversed mask [K, 1, H, W] and pattern [K, C, H, W] in [0, 1]."""

    masks: torch.Tensor
    patterns: torch.Tensor

    @property
    def norms(self) -> torch.Tensor:
        return self.masks.flatten(1).abs().sum(1)


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """(1 - mask) * x + mask * pattern, broadcast: float images in [0, 1]."""
    return (1 - mask) * x + mask * pattern


def anomaly_indices(norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(anomaly index of each class, whether its norm is below the median): |L1 - median| over
    1.4826 times the median absolute deviation, as the paper's `mad_outlier_detection.py`."""
    norms = norms.double()
    median = norms.quantile(0.5)
    deviation = (norms - median).abs()
    mad = (MAD_CONSISTENCY * deviation.quantile(0.5)).clamp_min(1e-12)  # all norms equal: no outlier
    return (deviation / mad).float(), norms < median


class _CostSchedule:
    """The reference's per-class cost schedule, best-trigger record and early stop, as tensors
    of one entry per class (no host sync)."""

    def __init__(self, options, masks: torch.Tensor, patterns: torch.Tensor):
        classes, device = len(masks), masks.device
        self.o = options
        self.cost = torch.full((classes,), options.init_cost, device=device)
        self.up = torch.zeros(classes, dtype=torch.long, device=device)
        self.down = torch.zeros_like(self.up)
        self.went_up = torch.zeros(classes, dtype=torch.bool, device=device)
        self.went_down = torch.zeros_like(self.went_up)
        self.best_norm = torch.full((classes,), float("inf"), device=device)
        self.early_best = self.best_norm.clone()
        self.stale = torch.zeros_like(self.up)
        self.done = torch.zeros_like(self.went_up)
        self.masks, self.patterns = masks.clone(), patterns.clone()

    def end_epoch(self, success: torch.Tensor, mean_norm: torch.Tensor, masks: torch.Tensor, patterns: torch.Tensor):
        o, active = self.o, ~self.done
        succeeded = success >= o.attack_success_threshold
        better = active & succeeded & (mean_norm < self.best_norm)
        self.masks[better], self.patterns[better] = masks[better], patterns[better]
        self.best_norm = torch.where(better, mean_norm, self.best_norm)
        if o.early_stop:
            found = self.best_norm < float("inf")
            stalled = self.best_norm >= o.early_stop_threshold * self.early_best
            self.stale = torch.where(found & active, torch.where(stalled, self.stale + 1, 0), self.stale)
            self.early_best = torch.minimum(self.early_best, self.best_norm)
            self.done |= active & self.went_up & self.went_down & (self.stale >= o.early_stop_patience)
        adjust = ~self.done
        self.up = torch.where(adjust, torch.where(succeeded, self.up + 1, 0), self.up)
        self.down = torch.where(adjust, torch.where(succeeded, 0, self.down + 1), self.down)
        raise_cost = adjust & (self.up >= o.patience)
        lower_cost = adjust & ~raise_cost & (self.down >= o.patience)
        self.up = torch.where(raise_cost, 0, self.up)
        self.down = torch.where(lower_cost, 0, self.down)
        self.cost = torch.where(raise_cost, self.cost * o.cost_multiplier, self.cost)
        self.cost = torch.where(lower_cost, self.cost / o.cost_multiplier**1.5, self.cost)
        self.went_up |= raise_cost
        self.went_down |= lower_cost

    def result(self, masks: torch.Tensor, patterns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The best triggers; the last ones for classes that never reached the threshold."""
        never = (self.best_norm == float("inf")).view(-1, 1, 1, 1)
        return torch.where(never, masks, self.masks), torch.where(never, patterns, self.patterns)


def _to_unit(parameter: torch.Tensor) -> torch.Tensor:
    """The tanh parametrisation of masks and patterns: any real to (0, 1)."""
    return torch.tanh(parameter) / 2 + 0.5


def _from_unit(values: torch.Tensor) -> torch.Tensor:
    """The tanh parameter of values in [0, 1]."""
    return torch.atanh((2 * values - 1).clamp(-1 + 1e-6, 1 - 1e-6))


def _reverse_classes(model: nn.Module, bonafide, classes: torch.Tensor, ctx, options, generator) -> ReversedTriggers:
    """Reverse-engineer the triggers of `classes` together (the module docstring's step 1)."""
    o, (channels, height, width) = options, bonafide.x.shape[1:]
    count, device = len(classes), bonafide.x.device
    mask_w = nn.Parameter(_from_unit(torch.rand(count, 1, height, width, device=device, generator=generator)))
    pattern_w = nn.Parameter(_from_unit(torch.rand(count, channels, height, width, device=device, generator=generator)))
    optimizer = torch.optim.Adam([mask_w, pattern_w], lr=o.mask_lr, betas=(0.5, 0.9))
    schedule = _CostSchedule(o, _to_unit(mask_w).detach(), _to_unit(pattern_w).detach())
    desc = f"neural_cleanse: classes {int(classes[0])}-{int(classes[-1])}"
    for _ in ctx.progress(range(o.reverse_epochs), desc=desc):
        order = epoch_order(len(bonafide), o.reverse_samples_per_epoch, generator, device)
        hits = torch.zeros(count, device=device)
        norm_sum = torch.zeros(count, device=device)
        for start in range(0, len(order), o.reverse_batch_size):
            images = to_model_input(bonafide.x[order[start : start + o.reverse_batch_size]])
            mask, pattern = _to_unit(mask_w), _to_unit(pattern_w)
            stamped = stamp(images.unsqueeze(0), mask.unsqueeze(1), pattern.unsqueeze(1))  # [K, B, C, H, W]
            with ctx.autocast():
                logits = model(stamped.flatten(0, 1)).float().view(count, len(images), -1)
            targets = classes.view(-1, 1).expand(-1, len(images))
            cross_entropy = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)
            norms = mask.flatten(1).sum(1)
            # a sum over classes: each class's parameters get exactly their own loss's gradient
            loss = (cross_entropy + schedule.cost * norms).sum()
            mask_w.grad, pattern_w.grad = torch.autograd.grad(loss, [mask_w, pattern_w])
            optimizer.step()
            hits += (logits.argmax(-1) == targets).sum(1)
            norm_sum += norms.detach() * len(images)
        with torch.no_grad():
            schedule.end_epoch(hits / len(order), norm_sum / len(order), _to_unit(mask_w), _to_unit(pattern_w))
        if schedule.done.all().item():  # one sync per epoch
            break
    with torch.no_grad():
        masks, patterns = schedule.result(_to_unit(mask_w), _to_unit(pattern_w))
    return ReversedTriggers(masks, patterns)


def reverse_engineer(model: nn.Module, bonafide, ctx, options) -> ReversedTriggers:
    """The reversed trigger of every class, `classes_per_pass` classes at a time."""
    generator = ctx.generator("neural_cleanse.reverse")
    model.eval()
    frozen = [p for p in model.parameters() if p.requires_grad]
    for parameter in frozen:
        parameter.requires_grad_(False)
    try:
        per_pass = options.classes_per_pass or ctx.num_classes
        every = torch.arange(ctx.num_classes, device=bonafide.x.device)
        parts = [_reverse_classes(model, bonafide, chunk, ctx, options, generator) for chunk in every.split(per_pass)]
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)
    return ReversedTriggers(torch.cat([p.masks for p in parts]), torch.cat([p.patterns for p in parts]))


@torch.no_grad()
def trigger_success(model: nn.Module, bonafide, triggers: ReversedTriggers, ctx) -> torch.Tensor:
    """Per class: the share of the bonafide images its reversed trigger sends to it."""
    model.eval()
    hits = torch.zeros(len(triggers.masks), device=bonafide.x.device)
    for start in range(0, len(bonafide), ctx.eval_batch_size):
        images = to_model_input(bonafide.x[start : start + ctx.eval_batch_size])
        for k, (mask, pattern) in enumerate(zip(triggers.masks, triggers.patterns)):
            with ctx.autocast():
                predicted = model(stamp(images, mask, pattern)).argmax(1)
            hits[k] += (predicted == k).sum()
    return hits / len(bonafide)


def unlearning_set(bonafide, flagged: list[int], triggers: ReversedTriggers, ratio: float, generator):
    """The bonafide images with a random `ratio` of them replaced by copies stamped with each
    flagged class's trigger, all under their true labels (BackdoorBench's `nc`)."""
    order = torch.randperm(len(bonafide), device=bonafide.x.device, generator=generator)
    kept = int(len(bonafide) * (1 - ratio))
    clean, unlearn = bonafide.subset(order[:kept]), bonafide.subset(order[kept:])
    images, labels = [clean.x], [clean.y]
    for k in flagged:
        stamped = stamp(to_model_input(unlearn.x), triggers.masks[k], triggers.patterns[k])
        images.append((stamped * 255).round().clamp(0, 255).to(torch.uint8))
        labels.append(unlearn.y)
    return bench.ImageData(torch.cat(images), torch.cat(labels))


class NeuralCleanse(bench.Defense):
    name = "neural_cleanse"
    description = "Neural Cleanse: reverse-engineer a minimal trigger per class, flag MAD outliers, unlearn them"
    paper = "https://ieeexplore.ieee.org/document/8835365"
    code = "https://github.com/bolunwang/backdoor"
    metrics = (
        bench.Metric(
            "flagged_classes",
            "NC flagged",
            higher_is_better=None,
            kind=bench.MetricKind.NUMBER,
            doc="classes Neural Cleanse flagged as backdoor targets (0: the model is returned unchanged)",
        ),
        bench.Metric(
            "anomaly_index",
            "NC anomaly",
            higher_is_better=None,
            kind=bench.MetricKind.NUMBER,
            doc="Neural Cleanse's largest anomaly index among classes with a reversed mask below the median "
            "(over 2: flagged)",
        ),
    )

    @dataclass(frozen=True)
    class Options:
        reverse_epochs: int = bench.option(80, "reverse-engineering epochs (BackdoorBench nc_epoch)", min=1)
        reverse_samples_per_epoch: int = bench.option(
            BACKDOORBENCH_BONAFIDE,
            "reverse-engineering samples per epoch, the bonafide images repeated to fill it (BackdoorBench: "
            "one pass over its 2,500 images); the cost is adjusted once per epoch; 0: one pass",
            min=0,
        )
        reverse_batch_size: int = bench.option(
            256, "bonafide images per reverse-engineering step (BackdoorBench 256; paper 32)", min=1
        )
        classes_per_pass: int = bench.option(
            10, "classes reverse-engineered together (a step runs this many times the batch); 0: all", min=0
        )
        mask_lr: float = bench.option(
            0.1, "Adam learning rate of mask and pattern (betas 0.5, 0.9)", min=0, min_exclusive=True
        )
        init_cost: float = bench.option(
            1e-3,
            "initial weight of the mask's L1 norm in the loss (0 would stay 0: the schedule multiplies it)",
            min=0,
            min_exclusive=True,
        )
        cost_multiplier: float = bench.option(
            2.0,
            "the cost is multiplied by this going up and divided by its 1.5th power going down",
            min=1,
            min_exclusive=True,
        )
        patience: int = bench.option(
            5, "epochs in a row above (below) the threshold before the cost goes up (down)", min=1
        )
        attack_success_threshold: float = bench.option(
            0.98,
            "share of stamped images sent to the class for a trigger to count (BackdoorBench; paper 0.99)",
            min=0,
            max=1,
        )
        early_stop: bool = bench.option(
            True, "stop a class once its best mask norm stalls (after the cost went up and down)"
        )
        early_stop_threshold: float = bench.option(
            0.99, "a best mask norm above this share of the earlier best counts as stalled", min=0, max=1
        )
        early_stop_patience: int = bench.option(25, "stalled epochs before a class stops", min=1)
        anomaly_threshold: float = bench.option(2.0, "flag a class whose anomaly index exceeds this (paper: 2)", min=0)
        unlearning_ratio: float = bench.option(
            0.2,
            "share of the bonafide images stamped with a flagged trigger for unlearning",
            min=0,
            max=1,
            min_exclusive=True,
        )
        epochs: int = bench.option(100, "unlearning epochs of samples_per_epoch samples (BackdoorBench: 100)", min=1)
        samples_per_epoch: int = bench.option(
            BACKDOORBENCH_BONAFIDE,
            "unlearning samples per epoch, the unlearning set repeated to fill it (BackdoorBench: one pass "
            "over its 2,500 images); 0: one pass",
            min=0,
        )
        lr: float = bench.option(
            0.01, "unlearning SGD lr, cosine-annealed per epoch (BackdoorBench)", min=0, min_exclusive=True
        )
        batch_size: int = bench.option(256, "unlearning images per step (BackdoorBench)", min=1)
        weight_decay: float = bench.option(5e-4, "unlearning L2 weight decay (BackdoorBench)", min=0)
        augment: bool = bench.option(
            False,
            "unlearn with the model's training augmentation, when its recipe augments (BackdoorBench does); "
            "off by default, as finetune and fine_pruning",
        )

    def apply(self, model, bonafide, ctx):
        o = self.options
        triggers = reverse_engineer(model, bonafide, ctx, o)
        indices, below_median = anomaly_indices(triggers.norms)
        flagged_mask = below_median & (indices > o.anomaly_threshold)
        flagged = flagged_mask.nonzero().flatten().tolist()
        success = trigger_success(model, bonafide, triggers, ctx)
        series = {
            "neural_cleanse_classes": [
                {"class": k, "mask_l1": norm, "anomaly_index": index, "flagged": float(hit), "trigger_success": share}
                for k, (norm, index, hit, share) in enumerate(
                    zip(triggers.norms.tolist(), indices.tolist(), flagged_mask.tolist(), success.tolist())
                )
            ]
        }
        largest = indices[below_median].max().item() if below_median.any() else 0.0
        values = {"flagged_classes": float(len(flagged)), "anomaly_index": largest}
        if flagged:
            data = unlearning_set(
                bonafide, flagged, triggers, o.unlearning_ratio, ctx.generator("neural_cleanse.unlearning_set")
            )
            self._unlearn(model, data, ctx)
        return bench.Defended(model.eval(), series=series, values=values)

    def _unlearn(self, model: nn.Module, data, ctx) -> None:
        """Fine-tune on the unlearning set: SGD with plain momentum 0.9, per-epoch cosine."""
        o = self.options
        recipe = dataclasses.replace(
            ctx.recipe,
            epochs=o.epochs,
            lr=o.lr,
            momentum=0.9,
            batch_size=o.batch_size,
            weight_decay=o.weight_decay,
            warmup_fraction=0.0,
            label_smoothing=0.0,
            augment=o.augment and ctx.recipe.augment,
        )
        train_classifier(
            model,
            data,
            recipe,
            ctx,
            flip=ctx.horizontal_flip,
            stream="neural_cleanse.unlearn",
            desc="neural_cleanse: unlearn",
            samples_per_epoch=o.samples_per_epoch,
            cosine_schedule=True,
            nesterov=False,
        )


@bench.hookimpl
def register_defenses(register):
    register(NeuralCleanse)
