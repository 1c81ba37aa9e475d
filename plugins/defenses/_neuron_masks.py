"""Per-neuron masks and mask-guided pruning, shared by `anp` and `rnp` (not a plugin).

A *neuron* is one channel of a batch-norm layer, as in both references (ANP's
`NoisyBatchNorm2d`, RNP's `MaskBatchNorm2d`): the mask m (and ANP's perturbations delta, xi)
scale the layer's per-channel affine parameters, y = x_hat * gamma * (m + delta) + beta * (1 + xi).
A model without (affine) batch norm gets the same masks on the output channels of its
convolutions, with the conv's weight in place of gamma and its bias (or 0) in place of beta.
`neuron_layers` applies this rule to any network, so no architecture is listed anywhere.

The masks live in forward hooks, so the network is never rebuilt: the hook rewrites the layer's
output y = z + b (z the weight part, b the per-channel bias) as z * scale + b * bias_scale.
Pruning a neuron, as both references do it, zeroes its weight part (the BN's gamma, the conv's
filter) and keeps its bias: `Pruner` does exactly that on the model's own parameters, so the
pruned model is the plain architecture with some weights at zero.

Choosing how much to prune uses only the defender's held-out bonafide images
(`split_held_out`, `choose_pruning`): BackdoorBench keeps the candidate with the lowest *test*
ASR (its issue #35); here the largest candidate whose held-out clean accuracy stays within a
relative drop of the unpruned model's wins.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch
from torch import nn

import bench
from bench import BenchError
from bench.toolkit import clean_accuracy


class PruneBy(enum.Enum):
    THRESHOLD = "threshold"  # candidates are mask values: prune every neuron whose mask is below
    FRACTION = "fraction"  # candidates are shares of all neurons, lowest masks first


@dataclass(frozen=True)
class PruningOptions:
    """How ANP and RNP choose what to prune; shared by both plugins' options."""

    held_out_share: float = bench.option(
        0.2,
        "share of the bonafide images held out from mask learning; only they choose the pruning amount",
        min=0,
        max=0.9,
        min_exclusive=True,
    )
    max_accuracy_drop: float = bench.option(
        0.1,
        "the largest candidate whose held-out accuracy is at most this fraction below the unpruned "
        "model's is pruned (BackdoorBench acc_ratio 0.1, which it measures on the test set)",
        min=0,
        max=1,
    )
    prune_by: PruneBy = bench.option(
        PruneBy.THRESHOLD, "candidates are mask thresholds or shares of the neurons (BackdoorBench pruning_by)"
    )
    prune_step: float = bench.option(
        0.05,
        "spacing of the candidates, from 0 (BackdoorBench pruning_step)",
        min=0,
        max=1,
        min_exclusive=True,
    )
    prune_max: float = bench.option(0.9, "the largest candidate (BackdoorBench pruning_max)", min=0, max=1)


def neuron_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the layers whose channels are the neurons, in registration order: every
    affine batch-norm layer; in a model without one, every nn.Conv2d."""
    norms: list[tuple[str, nn.Module]] = [
        (name, m) for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine
    ]
    if norms:
        return norms
    convs: list[tuple[str, nn.Module]] = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise BenchError("the model has neither an affine batch-norm layer nor a convolution whose channels to mask")
    return convs


def _channels(module: nn.Module) -> int:
    return _weight(module).shape[0]  # a conv's output channels, a batch norm's features


def _weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _per_channel(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(1, -1, *([1] * (like.dim() - 2)))


class NeuronMasks:
    """Masks (and optional perturbations) on every neuron of `layers`, one flat tensor each, in
    layer order. Inside a `with` block, forward hooks apply them; outside, the model is as it
    was. `mask` starts at ones and may require grad; `noise` (delta, on the weight part) and
    `noise_bias` (xi, on the bias) count only while `perturbed` is True."""

    def __init__(self, layers: list[nn.Module], device: torch.device):
        self.layers = layers
        self.sizes = [_channels(m) for m in layers]
        total = sum(self.sizes)
        self.mask = torch.ones(total, device=device)
        self.noise = torch.zeros(total, device=device)
        self.noise_bias = torch.zeros(total, device=device)
        self.perturbed = False
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> NeuronMasks:
        offset = 0
        for module, size in zip(self.layers, self.sizes):
            self._handles.append(module.register_forward_hook(self._hook(slice(offset, offset + size))))
            offset += size
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, neurons: slice):
        def hook(module, inputs, output):
            scale = self.mask[neurons]
            if self.perturbed:
                scale = scale + self.noise[neurons]
            bias = module.bias
            if bias is None:
                return output * _per_channel(scale, output).to(output.dtype)
            b = _per_channel(bias, output)
            bias_part = b * _per_channel(1 + self.noise_bias[neurons], output) if self.perturbed else b
            return ((output - b) * _per_channel(scale, output) + bias_part).to(output.dtype)

        return hook


class Pruner:
    """Zeroes the weight part of chosen neurons in place (a BN's gamma, a conv's output filter),
    from copies of the original weights taken at construction, so candidates can be tried in
    any order."""

    def __init__(self, layers: list[nn.Module]):
        self.layers = layers
        self.sizes = [_channels(m) for m in layers]
        self.original = [_weight(m).detach().clone() for m in layers]

    @torch.no_grad()
    def prune(self, neurons: torch.Tensor) -> None:
        """Restore every weight, then zero those of `neurons` (flat indices, layer order)."""
        keep = torch.ones(sum(self.sizes), device=self.original[0].device)
        keep[neurons] = 0.0
        for module, original, part in zip(self.layers, self.original, keep.split(self.sizes)):
            _weight(module).copy_(original * part.view(-1, *([1] * (original.dim() - 1))).to(original.dtype))


def split_held_out(data: bench.ImageData, share: float, generator: torch.Generator, who: str):
    """(images to learn masks on, held-out images): a seeded random `share` (rounded up) held out;
    each part keeps at least one image."""
    held = math.ceil(share * len(data))
    if len(data) < 2 or held >= len(data):
        raise BenchError(
            f"{who}: {len(data)} bonafide images cannot be split into mask-learning and held-out "
            f"images at held_out_share={share}; give more bonafide images or a smaller share"
        )
    order = torch.randperm(len(data), device=data.x.device, generator=generator)
    return data.subset(order[held:]), data.subset(order[:held])


@dataclass
class Choice:
    """What `choose_pruning` picked: the pruned neurons (lowest mask first), the candidate (a
    threshold or a share) and one row per candidate tried."""

    pruned: torch.Tensor
    candidate: float
    rows: list[dict]


def choose_pruning(
    model: nn.Module,
    masks: torch.Tensor,
    held_out: bench.ImageData,
    ctx: bench.RunContext,
    options: PruningOptions,
) -> Choice:
    """Prune `model` in place by the largest candidate whose held-out accuracy drop, relative to
    the unpruned model's, is at most `options.max_accuracy_drop`. Candidates run from 0 to
    `prune_max` in steps of `prune_step`: thresholds (neurons with mask below it) or shares of
    all neurons (the lowest masks, rounded down). The candidate 0 prunes nothing."""
    pruner = Pruner([m for _, m in neuron_layers(model)])
    if len(masks) != sum(pruner.sizes):
        raise BenchError(f"{len(masks)} mask values for {sum(pruner.sizes)} neurons")
    order = masks.argsort(stable=True)
    sorted_masks = masks[order]
    steps = int(options.prune_max / options.prune_step + 1e-9)
    candidates = [round(k * options.prune_step, 10) for k in range(steps + 1)]
    baseline = clean_accuracy(model, held_out, ctx)
    rows: list[dict] = []
    accuracy_of: dict[int, float] = {0: baseline}
    chosen_count, chosen = 0, 0.0
    for candidate in candidates:
        if options.prune_by is PruneBy.THRESHOLD:
            count = int((sorted_masks < candidate).sum().item())
        else:
            count = int(math.floor(candidate * len(masks) + 1e-9))
        if count not in accuracy_of:
            pruner.prune(order[:count])
            accuracy_of[count] = clean_accuracy(model, held_out, ctx)
        accuracy = accuracy_of[count]
        rows.append({"candidate": candidate, "pruned": count, "held_out_acc": accuracy})
        if baseline - accuracy <= options.max_accuracy_drop * baseline + 1e-12:
            chosen_count, chosen = count, candidate
    for row in rows:
        row["chosen"] = float(row["candidate"] == chosen)
    pruner.prune(order[:chosen_count])
    return Choice(order[:chosen_count], chosen, rows)


def mask_series(masks: torch.Tensor, sizes: list[int]) -> list[dict]:
    """One row per neuron: its layer (index into `neuron_layers`), channel and mask value."""
    layer = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    channel = torch.cat([torch.arange(s) for s in sizes])
    values = masks.detach().float().cpu()
    return [
        {"layer": int(i), "channel": int(c), "mask": float(v)}
        for i, c, v in zip(layer.tolist(), channel.tolist(), values.tolist())
    ]


def pruning_result(
    model: nn.Module, masks: torch.Tensor, choice: Choice, series: dict[str, list[dict]] | None = None
) -> bench.Defended:
    """The `bench.Defended` both plugins return: the pruned model; the values `pruned_neurons`
    and `prune_threshold` (the chosen candidate); the series `prune_candidates` (candidate,
    neurons pruned, held-out accuracy, chosen), `neuron_masks` (every neuron's mask) and
    `pruned_neurons` (layer, channel, mask of each pruned neuron, lowest mask first)."""
    sizes = [_channels(m) for _, m in neuron_layers(model)]
    per_neuron = mask_series(masks, sizes)
    model.eval()
    return bench.Defended(
        model,
        series={
            "prune_candidates": choice.rows,
            "neuron_masks": per_neuron,
            "pruned_neurons": [per_neuron[i] for i in choice.pruned.tolist()],
            **(series or {}),
        },
        values={"pruned_neurons": float(len(choice.pruned)), "prune_threshold": float(choice.candidate)},
    )


PRUNING_METRICS = (
    bench.Metric(
        "pruned_neurons",
        "Pruned",
        higher_is_better=None,
        kind=bench.MetricKind.NUMBER,
        doc="neurons (batch-norm channels) pruned",
    ),
    bench.Metric(
        "prune_threshold",
        "Threshold",
        higher_is_better=None,
        kind=bench.MetricKind.NUMBER,
        doc="the pruning candidate chosen on held-out bonafide images: a mask threshold (or a share of the neurons)",
    ),
)
