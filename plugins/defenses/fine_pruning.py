"""`fine_pruning`: Fine-Pruning (Liu, Dolan-Gavitt & Garg, RAID 2018).

A backdoor tends to live in channels of the last convolutional layer that clean images leave
dormant. The defense measures each channel's mean activation on the bonafide set, prunes
channels from the least active up while bonafide accuracy holds, then fine-tunes the pruned
model on the bonafide set.

Where a channel is cut (the "prune point"): one forward pass on two bonafide images finds the
last nn.Conv2d to run, then the last module to finish after it whose output still has that
conv's channels, so that a pruned channel is zero after the activation that follows the conv
(and after a residual sum). On `small_cnn` that is the pooling after the last conv-BN-ReLU; on
the pre-activation `preact_resnet18` it is the head's batch norm, whose output goes through a
functional ReLU and global pooling into the linear layer: BackdoorBench's choice of masking the
linear layer's inputs; on post-activation ResNets it is the residual stage's output. A channel's
activation is the mean of the positive part of that output (i.e. after the ReLU that follows a
batch norm), over images and pixels. `layer` names the module instead.

Pruning masks the prune point's output with a fixed 0/1 buffer, so pruned channels stay zero
during fine-tuning and afterwards. Stopping rule and defaults follow BackdoorBench's `fp`:
1% of the channels per step, stop before the relative drop in accuracy exceeds 10%, then fine-
tune (100 epochs, SGD lr 0.01 with plain momentum 0.9, wd 5e-4, per-epoch cosine annealing).
BackdoorBench measured that drop on the test set; here it is measured on the bonafide set,
the only clean data a defender has. An epoch of fine-tuning is 10,000 samples (the bonafide
images repeated), the budget of the MCR reference's curve and fine-tuning baseline, so the three
repair defenses compete on equal budgets at every bonafide size.

Returns a `bench.Defended`: the pruned model, the series `prune_steps` (bonafide accuracy after
each step tried) and `pruned_channels` (in pruning order), and the value `pruned_channels`
(how many were pruned) for the leaderboard row.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

import bench
from bench import BenchError
from bench.toolkit import clean_accuracy, to_model_input
from bench.toolkit import REFERENCE_SAMPLES_PER_EPOCH
from bench_plugins.defenses.finetune import fine_tune

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU)


class ChannelMask(nn.Module):
    """Wraps a module and multiplies its output channels by a fixed 0/1 mask."""

    def __init__(self, module: nn.Module, channels: int, device: torch.device):
        super().__init__()
        self.module = module
        self.mask: torch.Tensor
        self.register_buffer("mask", torch.ones(channels, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(x)
        return out * self.mask.view(1, -1, *([1] * (out.dim() - 2))).to(out.dtype)


@torch.no_grad()
def find_prune_point(net: nn.Module, sample: torch.Tensor, layer: str = "") -> tuple[str, str]:
    """(module whose output channels are pruned, last convolution). With `layer` empty: run
    `sample` through `net` and take the last module to finish, once called, whose output has
    the last convolution's channels; a module called more than once (a shared ReLU) is skipped."""
    modules = dict(net.named_modules())
    if layer and layer not in modules:
        names = [n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d) + _ACTIVATIONS)]
        raise BenchError(f"fine_pruning: the model has no module '{layer}'; candidates: " + ", ".join(names))
    finished: list[tuple[str, tuple[int, ...]]] = []
    calls: Counter[str] = Counter()

    def recorder(name):
        def record(module, inputs, output):
            calls[name] += 1
            finished.append((name, tuple(output.shape) if isinstance(output, torch.Tensor) else ()))

        return record

    handles = [m.register_forward_hook(recorder(n)) for n, m in modules.items() if n]
    try:
        net.eval()(sample)
    finally:
        for handle in handles:
            handle.remove()
    convs = [i for i, (name, _) in enumerate(finished) if isinstance(modules[name], nn.Conv2d)]
    if not convs:
        raise BenchError("fine_pruning: the model ran no nn.Conv2d; name the module to prune with `layer`")
    conv = finished[convs[-1]][0]
    if layer:
        return layer, conv
    channels, point = modules[conv].out_channels, conv
    for name, shape in finished[convs[-1] :]:
        if len(shape) == 4 and shape[1] == channels and calls[name] == 1:
            point = name
    return point, conv


@torch.no_grad()
def mean_channel_activation(
    net: nn.Module, point: nn.Module, bonafide: bench.ImageData, ctx: bench.RunContext
) -> torch.Tensor:
    """Mean of the positive part of `point`'s output per channel, over all bonafide images and
    pixels (eval mode), on the device."""
    total = []

    def record(module, inputs, output):
        dims = [0] + list(range(2, output.dim()))
        total.append(output.float().clamp(min=0).mean(dim=dims) * len(output))

    hook = point.register_forward_hook(record)
    net.eval()
    try:
        with ctx.autocast():
            for start in range(0, len(bonafide), ctx.eval_batch_size):
                net(to_model_input(bonafide.x[start : start + ctx.eval_batch_size]))
    finally:
        hook.remove()
    return torch.stack(total).sum(0) / len(bonafide)


class FinePruning(bench.Defense):
    name = "fine_pruning"
    description = "Fine-Pruning: prune the least active last-layer channels on bonafide data, then fine-tune"
    paper = "https://arxiv.org/abs/1805.12185"
    code = "https://github.com/SCLBD/BackdoorBench"
    metrics = (
        bench.Metric(
            "pruned_channels",
            "Pruned",
            higher_is_better=None,
            kind=bench.MetricKind.NUMBER,
            doc="channels fine-pruning removed",
        ),
    )

    @dataclass(frozen=True)
    class Options:
        layer: str = bench.option(
            "",
            "module whose output channels are pruned, e.g. 'net.bn'; empty: the last "
            "module to run after the last conv whose output has that conv's channels",
        )
        max_accuracy_drop: float = bench.option(
            0.1,
            "stop before bonafide accuracy falls by more than this "
            "fraction of the unpruned model's (BackdoorBench acc_ratio)",
            min=0,
            max=1,
        )
        max_prune_ratio: float = bench.option(1.0, "never prune more than this share of the channels", min=0, max=1)
        prune_step: float = bench.option(
            0.01,
            "share of the channels pruned per step (BackdoorBench once_prune_ratio); at least one",
            min=0,
            max=1,
            min_exclusive=True,
        )
        epochs: int = bench.option(100, "fine-tuning epochs of samples_per_epoch samples (0: prune only)", min=0)
        samples_per_epoch: int = bench.option(
            REFERENCE_SAMPLES_PER_EPOCH,
            "fine-tuning samples per epoch: the bonafide images are repeated to fill "
            "it, so the budget is the same for every bonafide size; 0: one pass over the bonafide set",
            min=0,
        )
        lr: float = bench.option(
            0.01, "fine-tuning lr, cosine-annealed to zero over the epochs", min=0, min_exclusive=True
        )
        batch_size: int = bench.option(256, "fine-tuning images per step", min=1)
        weight_decay: float = bench.option(5e-4, "fine-tuning L2 weight decay", min=0)
        augment: bool = bench.option(
            False,
            "fine-tune with the model's training augmentation, when its recipe augments; off by default, "
            "as for finetune and mcr (the MCR reference's), so the three repair defenses train alike",
        )

    def check_model(self, model, sample):
        find_prune_point(model, sample, self.options.layer)

    def apply(self, model, bonafide, ctx):
        o = self.options
        point_name, _ = find_prune_point(model, to_model_input(bonafide.x[:2]), o.layer)
        point = model.get_submodule(point_name)
        activation = mean_channel_activation(model, point, bonafide, ctx)
        channels = len(activation)
        masked = ChannelMask(point, channels, activation.device)
        parent_name, _, child_name = point_name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, masked)

        order = activation.argsort(stable=True).tolist()  # least active first
        pruned, steps = self._prune(model, masked, order, bonafide, ctx)
        masked.mask.fill_(1.0)
        masked.mask[pruned] = 0.0

        if o.epochs > 0:
            fine_tune(
                model, bonafide, ctx, o, stream="fine_pruning", desc="fine_pruning: fine-tune", cosine_schedule=True
            )
        model.eval()
        accuracy_at = {count: acc for count, acc in steps}
        series = {
            "pruned_channels": [
                {"index": index, "bonafide_acc": accuracy_at[self._step_of(i + 1, steps)]}
                for i, index in enumerate(pruned)
            ],
            "prune_steps": [{"pruned": count, "bonafide_acc": acc} for count, acc in steps],
        }
        return bench.Defended(model, series=series, values={"pruned_channels": len(pruned)})

    def _prune(
        self,
        model: nn.Module,
        masked: ChannelMask,
        order: list[int],
        bonafide: bench.ImageData,
        ctx: bench.DefenseContext,
    ) -> tuple[list[int], list[tuple[int, float]]]:
        """Prune in steps while the relative bonafide accuracy drop stays within bounds. Returns
        the pruned channels (in pruning order) and (channels pruned, bonafide accuracy) per step
        tried, starting from 0; the last step tried is the one that broke the rule, if any did."""
        o = self.options
        channels = len(order)
        limit = int(math.floor(o.max_prune_ratio * channels + 1e-9))
        step = max(1, math.ceil(o.prune_step * channels))
        counts = sorted(set(range(step, limit, step)) | ({limit} if limit > 0 else set()))
        baseline = clean_accuracy(model, bonafide, ctx)
        steps, accepted = [(0, baseline)], 0
        for count in counts:
            masked.mask[order[:count]] = 0.0
            accuracy = clean_accuracy(model, bonafide, ctx)
            steps.append((count, accuracy))
            if (baseline - accuracy) / max(baseline, 1e-12) > o.max_accuracy_drop:
                break
            accepted = count
        return order[:accepted], steps

    @staticmethod
    def _step_of(position: int, steps: list[tuple[int, float]]) -> int:
        """The step (channels pruned so far) in which the `position`-th channel was pruned."""
        return next(count for count, _ in steps if count >= position)


@bench.hookimpl
def register_defenses(register):
    register(FinePruning)
