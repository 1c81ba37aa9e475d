"""`input_aware`: the Input-Aware Dynamic Backdoor (Nguyen & Tran, NeurIPS 2020, "Input-Aware
Dynamic Backdoor Attack"). The attacker is the trainer: it trains two trigger generators of its
own and controls every training batch. Every image gets its own trigger, made from the image.

Both generators are the reference's encoder-decoder (`networks/models.py`, `Generator`): per
level two 3x3 conv-BN(momentum 0.05)-ReLU blocks and a 2x2 max-pool, the channels starting at
`generator_width` and doubling per level; a middle block; per level a bilinear x2 upsampling and
two blocks, halving the channels, the last block (no ReLU) giving the output channels; then
tanh(.) / (2 + 1e-7) + 0.5, in [0, 1]. The levels are how many times H and W halve evenly while
staying >= 4, at most 3 (the reference's CIFAR-10 count: 32 -> 4; 28 x 28 MNIST gives its 2,
8 x 8 digits 1). Their inputs are images normalised by the training set's channel statistics
(those the attacked `Classifier` uses), as the reference feeds its networks normalised images.
The pattern generator G has the image's channels; the mask generator M one, passed through the
reference's threshold tanh(20 m - 10) / (2 + 1e-7) + 0.5. The trigger blends an image x with its
pattern p = G(x) where its mask m = threshold(M(x)) is on: x' = x + (p - x) * m.

1. `poison` (once; cached with the attacked model) trains M alone on the clean training set for
   `mask_epochs` epochs of pairs of batches of 128 (two independent shuffles per epoch, the
   reference's two loaders), Adam (lr `mask_lr`, betas (0.5, 0.9)), lr x 0.1 after epochs 10
   and 20 (`schedulerM_milestones`), on the reference's `train_mask_step` loss:
   lambda_norm * mean(relu(m1 - mask_density)) + lambda_div * mean(d(x1, x2) / (d(m1, m2) +
   1e-7)), with d the root mean square difference per image (images normalised); the
   diversity term keeps different images from getting the same mask. M is then frozen (eval
   mode). G is initialised (seeded, like M, from the job seed's `input_aware_networks`
   stream). The training set is returned unchanged; the state holds "generator" and
   "mask_network" (state dicts), "mean" and "std" (channel statistics) and an empty
   "poisoned_indices" (no training image is poisoned once and for all).
2. `training_batch`, on every augmented float batch of B images, as the reference's
   `train_step`: the first n = int(poison_rate * B) images get their own trigger and the target
   label (all-to-one: `target_class`; all-to-all: (y + 1) mod K); the next int(n * cross_ratio)
   get the pattern and mask of another image of the batch (the cross mode) and keep their
   labels; the rest stay clean. The other image of position i is i + s (mod B), one random shift
   s in 1..B-1 per batch, never the image itself (the reference takes it from a second,
   independently shuffled loader). G trains with the classifier on CE(batch) + lambda_div *
   mean(d(x_i, x_i+s) / (d(G(x_i), G(x_i+s)) + 1e-7)) over the n triggered images (patterns
   and images normalised, as the reference), Adam (lr `generator_lr`, betas (0.5, 0.9)). When
   poison_rate * B < 1, one image is triggered with probability poison_rate * B
   (BackdoorBench's `generalize_to_lower_pratio`), drawn from the `input_aware_gate` stream.
3. `evaluate` triggers the float test images (never rounded to uint8), each with its own
   pattern and mask: all-to-one ASR is the share of non-target test images classified as the
   target, RA the share kept at their class; all-to-all counts every image against
   (y + 1) mod K. "Cross accuracy" (diagnostic; BackdoorBench's and the paper's cross test) is
   the accuracy on test images carrying the pattern and mask of another test image (a fixed
   cyclic pairing from the `input_aware_cross_eval` stream), labels kept: high when a trigger
   only fires on the image it was made for.

Defaults, from BackdoorBench `config/attack/inputaware/default.yaml` and `attack/inputaware.py`
(the same in the paper's `config.py`): pratio 0.1 (`poison_rate`), lr_G 0.01, lr_M 0.01,
lambda_div 1, lambda_norm 100, mask_density 0.032, clean_train_epochs 25 (`mask_epochs`),
schedulerM milestones [10, 20] x 0.1, target 0, all2one; Adam betas (0.5, 0.9) for both
networks (`attack/inputaware.py`); cross_ratio 1 (BackdoorBench's num_cross = num_bd, the
paper's p_cross = p_attack = 0.1); generator width 32 (the reference's CIFAR-10 value; 16 on
MNIST).

Deviations:
- The reference takes one joint step of classifier and G on CE + diversity. Here the core owns
  the classifier's step (its recipe, schedule and cache), so `training_batch` first updates G
  alone: it builds the batch through G, runs the classifier (train mode, autocast) on it, takes
  the gradient of CE + lambda_div * diversity for G's parameters only (`torch.autograd.grad`:
  the classifier's .grad is never touched, its buffers are restored so that its BatchNorm
  statistics see each batch once), steps G, and returns the batch rebuilt with the updated G,
  detached, on which the core steps the classifier: alternating G then classifier updates on
  the same batch instead of one joint step. G's plain CE carries no label smoothing.
- G keeps a constant learning rate: the reference's G milestones (200, 300, 400, 500 epochs)
  lie beyond BackdoorBench's 100 epochs and this benchmark's budgets.
- The reference augments (random crop 5, rotation 10, flip) with its own transforms; here G is
  trained on the core's augmented batches, and M on un-augmented training images (its losses
  use no labels). The trigger networks run in full precision (only the classifier under
  autocast). G sees its triggered and cross sources in one forward (the reference: two), and
  the diversity pairs are its own (image i with image i + s) rather than the reference's
  inputs1[:n] with inputs2[n:2n] (which equal the cross images only when cross_ratio is 1).
  lambda_div multiplies M's diversity term once (the reference twice: the same at 1).
- `poison_rate * (1 + cross_ratio)` may not exceed 1 (checked when the suite is read).
- The generators upsample bilinearly, as the reference; on CUDA that op's backward has no
  deterministic kernel, so torch warns (a run's deterministic mode is warn-only) and a GPU rerun
  of an Input-aware model may differ in the last digits. On the CPU runs are exact.

Cost: M's training is `mask_epochs` passes over the training set with two forward passes and
one backward pass of M per batch (M at width 32 is about 15% of a PreAct-ResNet-18's forward
on CIFAR-10). In training, each batch adds a forward and a backward pass (input gradients only)
of the classifier, G's forward and backward pass on about 0.3 B images and G's forward on 0.2 B.
Measured on one CPU thread, digits, small_cnn width 32, 15 epochs: 3.6 s plain, 8.9 s attacked
(2.5x; 8.6 s with G at width 8), plus 11.9 s for M's 25 epochs (4.5 s at width 8).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import bench
from bench import Attack, ImageData, Metric, MetricKind, Stage
from bench.toolkit import accuracy, channel_stats, derived_seed, eval_mode, to_model_input
from bench_plugins.attacks.trigger_backdoor import TargetMode, TargetModes, batch_shares, check_batch_shares

NETWORKS_STREAM = "input_aware_networks"
MASK_STREAM = "input_aware_mask"
GATE_STREAM = "input_aware_gate"
CROSS_EVAL_STREAM = "input_aware_cross_eval"
MASK_BATCH_SIZE = 128  # BackdoorBench's and the paper's batch size
MASK_MILESTONES = (10, 20)  # schedulerM_milestones: lr x 0.1 after these epochs
MAX_LEVELS = 3  # the reference's down/up-sampling steps on CIFAR-10
EPSILON = 1e-7  # the reference's EPSILON
ADAM_BETAS = (0.5, 0.9)


def conv_block(c_in: int, c_out: int, relu: bool = True) -> nn.Sequential:
    """The reference's Conv2dBlock: 3x3 conv (padding 1), BatchNorm (momentum 0.05), ReLU."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out, momentum=0.05)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class HalfTanh(nn.Module):
    """tanh(x) / (2 + 1e-7) + 0.5: the generators' output, in [0, 1]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) / (2 + EPSILON) + 0.5


def threshold(mask: torch.Tensor) -> torch.Tensor:
    """The reference's near-binary mask: tanh(20 m - 10) / (2 + 1e-7) + 0.5."""
    return torch.tanh(mask * 20 - 10) / (2 + EPSILON) + 0.5


def levels(height: int, width: int) -> int:
    """How many times the generators halve H and W: evenly, staying >= 4, at most 3."""
    count = 0
    while count < MAX_LEVELS and height % 2 == 0 and width % 2 == 0 and height >= 8 and width >= 8:
        height, width, count = height // 2, width // 2, count + 1
    return count


def trigger_network(in_channels: int, out_channels: int, width: int, height_width: tuple[int, int]) -> nn.Sequential:
    """The reference's encoder-decoder `Generator` for images of this size (see the module doc);
    an image too small to halve gets one level without pooling."""
    pooled = levels(*height_width)
    layers: list[nn.Module] = []
    channels = in_channels
    for level in range(max(pooled, 1)):
        wider = width * 2**level
        layers += [conv_block(channels, wider), conv_block(wider, wider)]
        if level < pooled:
            layers.append(nn.MaxPool2d(2))
        channels = wider
    layers.append(conv_block(channels, channels))
    for level in range(max(pooled, 1)):
        last = level == max(pooled, 1) - 1
        if level < pooled:
            layers.append(nn.Upsample(scale_factor=2, mode="bilinear"))
        narrower = out_channels if last else channels // 2
        layers += [conv_block(channels, channels), conv_block(channels, narrower, relu=not last)]
        channels = narrower
    layers.append(HalfTanh())
    return nn.Sequential(*layers)


def rms_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image, the root mean square difference (the reference's sqrt(mean(MSE))); its
    gradient is 0, not NaN, where the two are equal."""
    return torch.linalg.vector_norm((a - b).flatten(1), dim=1) / (a[0].numel() ** 0.5)


def diversity_loss(inputs1, inputs2, outputs1, outputs2) -> torch.Tensor:
    """mean(d(inputs1, inputs2) / (d(outputs1, outputs2) + 1e-7)): small when different inputs
    get different outputs."""
    return (rms_distance(inputs1, inputs2) / (rms_distance(outputs1, outputs2) + EPSILON)).mean()


def blend(x: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The reference's trigger: x + (pattern - x) * mask."""
    return x + (pattern - x) * mask


class TriggerNetworks:
    """G and M for one attack state, on the state's device, with the channel statistics."""

    def __init__(self, state: dict[str, Any], shape: tuple[int, ...], width: int):
        channels, height, image_width = shape
        device = state["mean"].device
        self.mean, self.std = state["mean"].view(1, -1, 1, 1), state["std"].view(1, -1, 1, 1)
        # their initial weights are overwritten at once: built aside so the global generator is left as it was
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            self.pattern = trigger_network(channels, channels, width, (height, image_width)).to(device)
            self.mask = trigger_network(channels, 1, width, (height, image_width)).to(device)
        self.pattern.load_state_dict(state["generator"])
        self.mask.load_state_dict(state["mask_network"])
        self.mask.eval().requires_grad_(False)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def masks(self, x: torch.Tensor) -> torch.Tensor:
        return threshold(self.mask(self.normalise(x)))

    def triggered(self, x: torch.Tensor, sources: torch.Tensor | None = None) -> torch.Tensor:
        """x with the trigger (pattern and mask) made from `sources` (default: x itself)."""
        sources = x if sources is None else sources
        return blend(x, self.pattern(self.normalise(sources)), self.masks(sources))


class LiveGenerator:
    """The pattern generator being trained, with its optimizer: its parameters and buffers share
    storage with the state's "generator" tensors, so the state holds the trained G."""

    def __init__(self, state: dict[str, Any], shape: tuple[int, ...], options, ctx):
        self.networks = TriggerNetworks(state, shape, options.generator_width)
        self.networks.pattern.train()
        state["generator"] = self.networks.pattern.state_dict()
        self.shared = state["generator"]
        self.optimizer = torch.optim.Adam(self.networks.pattern.parameters(), lr=options.generator_lr, betas=ADAM_BETAS)
        self.gate = random.Random(derived_seed(ctx.seed, GATE_STREAM))  # host draws: no device sync


class InputAware(TargetModes, Attack):
    name = "input_aware"
    description = "Input-aware dynamic backdoor: a generator makes each image's own trigger, trained with the model"
    paper = "https://arxiv.org/abs/2010.08138"
    code = "https://github.com/VinAIResearch/input-aware-backdoor-attack-release"
    stage = Stage.TRAINING
    controls_training = True
    metrics = (
        Metric("asr", "ASR", higher_is_better=False, doc="attack success rate"),
        Metric("ra", "RA", higher_is_better=True, doc="robust accuracy on triggered inputs"),
        Metric(
            "cross_accuracy",
            "Cross acc",
            higher_is_better=None,
            kind=MetricKind.PERCENT,
            diagnostic=True,
            doc="Input-aware: accuracy on test images carrying another image's trigger (labels kept)",
        ),
    )
    success_metric = "asr"

    @dataclass(frozen=True)
    class Options:
        poison_rate: float = bench.option(
            0.1, "share of every training batch given its own trigger and relabelled (BackdoorBench's pratio 0.1)",
            min=0, max=1,
        )  # fmt: skip
        cross_ratio: float = bench.option(
            1.0, "cross-trigger images (another image's trigger, label kept) per triggered image (reference: 1)", min=0
        )
        target_class: int = bench.option(0, "class every triggered image is relabelled to (all-to-one)", min=0)
        target_mode: TargetMode = bench.option(
            TargetMode.ALL_TO_ONE,
            "all_to_one: triggered images get target_class; all_to_all: label y becomes (y + 1) mod classes",
        )
        lambda_div: float = bench.option(1.0, "weight of the diversity losses of G and M (reference: 1)", min=0)
        lambda_norm: float = bench.option(
            100.0, "weight of the mask's density penalty in M's training (reference: 100)", min=0
        )
        mask_density: float = bench.option(
            0.032, "mask value above which M is penalised per pixel (reference: 0.032)", min=0, max=1
        )
        mask_epochs: int = bench.option(25, "epochs of M's training before the attack (reference: 25)", min=1)
        generator_lr: float = bench.option(
            0.01, "Adam learning rate of the pattern generator G (reference lr_G 0.01)", min=0, min_exclusive=True
        )
        mask_lr: float = bench.option(
            0.01, "Adam learning rate of the mask generator M (reference lr_M 0.01)", min=0, min_exclusive=True
        )
        generator_width: int = bench.option(
            32, "channels of G's and M's first convolution, doubled per level (reference: 32 on CIFAR-10)", min=1
        )

        def __post_init__(self):
            check_batch_shares(self.poison_rate, self.cross_ratio)

    def __init__(self, options=None):
        super().__init__(options)
        self._live: LiveGenerator | None = None

    def check_dataset(self, splits):
        self._check_target(splits.num_classes)

    def poison(self, train, ctx):
        self._check_target(ctx.num_classes)
        o = self.options
        channels, height, width = train.x.shape[1:]
        mean, std = channel_stats(train.x)
        device = train.x.device
        # built on the CPU from the job seed (the same weights on any device); the core's global
        # generator is left as it was
        with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
            ctx.seed_global_rng(NETWORKS_STREAM)
            pattern = trigger_network(channels, channels, o.generator_width, (height, width))
            mask = trigger_network(channels, 1, o.generator_width, (height, width))
        state: dict[str, Any] = {
            "mean": torch.tensor(mean, device=device),
            "std": torch.tensor(std, device=device),
        }
        self.train_mask_network(mask.to(device), train, state, ctx)
        state["generator"] = pattern.to(device).state_dict()
        state["mask_network"] = mask.state_dict()
        state["poisoned_indices"] = torch.empty(0, dtype=torch.long, device=device)
        return train, state

    def train_mask_network(self, mask: nn.Module, train: ImageData, state: dict[str, Any], ctx) -> None:
        """The reference's `train_mask_step` for `mask_epochs` epochs: density penalty plus
        diversity between pairs of batches from two independent shuffles."""
        o = self.options
        mean, std = state["mean"].view(1, -1, 1, 1), state["std"].view(1, -1, 1, 1)
        generator = ctx.generator(MASK_STREAM)
        optimizer = torch.optim.Adam(mask.parameters(), lr=o.mask_lr, betas=ADAM_BETAS)
        mask.train()
        for epoch in ctx.progress(range(o.mask_epochs), desc=f"{self.name} mask"):
            for group in optimizer.param_groups:
                group["lr"] = o.mask_lr * 0.1 ** sum(epoch >= milestone for milestone in MASK_MILESTONES)
            first, second = (torch.randperm(len(train), device=train.x.device, generator=generator) for _ in "12")
            for start in range(0, len(train), MASK_BATCH_SIZE):
                x1 = (to_model_input(train.x[first[start : start + MASK_BATCH_SIZE]]) - mean) / std
                x2 = (to_model_input(train.x[second[start : start + MASK_BATCH_SIZE]]) - mean) / std
                masks1, masks2 = threshold(mask(x1)), threshold(mask(x2))
                density = F.relu(masks1 - o.mask_density).mean()
                loss = o.lambda_norm * density + o.lambda_div * diversity_loss(x1, x2, masks1, masks2)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        mask.eval().requires_grad_(False)

    def batch_counts(self, batch_size: int) -> tuple[int, int, bool]:
        """(triggered, cross, gated) for a batch (see `batch_shares`)."""
        return batch_shares(self.options.poison_rate, self.options.cross_ratio, batch_size)

    def live_generator(self, state: dict[str, Any], shape: tuple[int, ...], ctx) -> LiveGenerator:
        """The G being trained for this state (made on the first batch of a training)."""
        if self._live is None or state.get("generator") is not self._live.shared:
            self._live = LiveGenerator(state, shape, self.options, ctx)
        return self._live

    def training_batch(self, model, x, y, generator, ctx, state):
        triggered, cross, gated = self.batch_counts(len(x))
        live = self.live_generator(state, tuple(x.shape[1:]), ctx)
        if gated and live.gate.random() >= self.options.poison_rate * len(x):
            return x, y
        if triggered == 0:
            return x, y
        size = len(x)
        if size < 2:  # no other image to pair with: no cross images, no diversity term
            cross = 0
        # image i's other image is i + shift (mod B), shift in 1..B-1: never the image itself
        shift = torch.randint(1, max(size, 2), (1,), device=x.device, generator=generator)
        others = (torch.arange(size, device=x.device) + shift) % size
        changed = triggered + cross
        # the trigger's sources: each triggered image itself, then each cross image's other image
        sources = torch.cat([x[:triggered], x[others[triggered:changed]]])
        networks = live.networks
        with torch.no_grad():
            masks = networks.masks(sources)
        labels = torch.cat([self.poisoned_labels(y[:triggered], ctx.num_classes), y[triggered:]])
        partners = others[:triggered] if size > 1 else None
        self._generator_step(model, x, labels, sources, masks, triggered, partners, live, ctx)
        with torch.no_grad():  # the batch rebuilt with the updated G (its BatchNorm statistics see it)
            patterns = networks.pattern(networks.normalise(sources))
        out = x.clone()
        out[:changed] = blend(x[:changed], patterns, masks)
        return out.detach(), labels

    def _generator_step(self, model, x, labels, sources, masks, triggered, partners, live, ctx) -> None:
        """One Adam step of G on CE(classifier(batch through G)) + lambda_div * diversity (the
        first `triggered` images against their `partners`), with gradients for G only; the
        classifier's buffers and G's are left as they were."""
        networks = live.networks
        changed = len(sources)
        classifier_buffers = [b.clone() for b in model.buffers()]
        generator_buffers = [b.clone() for b in networks.pattern.buffers()]
        with torch.enable_grad():
            inputs = torch.cat([sources, x[partners]]) if partners is not None else sources
            patterns = networks.pattern(networks.normalise(inputs))
            batch = torch.cat([blend(x[:changed], patterns[:changed], masks), x[changed:]])
            with ctx.autocast():
                logits = model(batch)
            loss = F.cross_entropy(logits.float(), labels)
            if partners is not None and self.options.lambda_div > 0:
                own, theirs = patterns[:triggered], patterns[changed:]
                loss = loss + self.options.lambda_div * diversity_loss(
                    networks.normalise(x[:triggered]),
                    networks.normalise(x[partners]),
                    networks.normalise(own),
                    networks.normalise(theirs),
                )
            parameters = list(networks.pattern.parameters())
            gradients = torch.autograd.grad(loss, parameters)
        for parameter, gradient in zip(parameters, gradients):
            parameter.grad = gradient
        live.optimizer.step()
        live.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), classifier_buffers):
                buffer.copy_(saved)
            for buffer, saved in zip(networks.pattern.buffers(), generator_buffers):
                buffer.copy_(saved)

    def networks(self, state: dict[str, Any], shape: tuple[int, ...]) -> TriggerNetworks:
        """G and M of a (trained) state, in eval mode."""
        networks = TriggerNetworks(state, shape, self.options.generator_width)
        networks.pattern.eval().requires_grad_(False)
        return networks

    def _predict(self, model, networks: TriggerNetworks, images: torch.Tensor, sources: torch.Tensor, ctx):
        """Classes predicted for float images carrying the trigger made from `sources` (uint8)."""
        outputs = []
        with torch.no_grad(), eval_mode(model):
            for start in range(0, len(images), ctx.eval_batch_size):
                chunk = to_model_input(images[start : start + ctx.eval_batch_size])
                made_from = to_model_input(sources[start : start + ctx.eval_batch_size])
                triggered = networks.triggered(chunk, made_from)
                with ctx.autocast():
                    outputs.append(model(triggered).argmax(dim=1))
        return torch.cat(outputs) if outputs else torch.empty(0, dtype=torch.long, device=images.device)

    def evaluate(self, model, test: ImageData, ctx, state):
        self._check_target(ctx.num_classes)
        networks = self.networks(state, tuple(test.x.shape[1:]))
        # cross pairing: one random cycle through the test set, so no image is its own partner
        order = torch.randperm(len(test), device=test.x.device, generator=ctx.generator(CROSS_EVAL_STREAM))
        partner = torch.empty_like(order)
        partner[order] = order.roll(-1)
        crossed = self._predict(model, networks, test.x, test.x[partner], ctx)
        cross_accuracy = accuracy(crossed, test.y)
        scores = self.scored(lambda images: self._predict(model, networks, images, images, ctx), test, ctx.num_classes)
        return {**scores, "cross_accuracy": cross_accuracy}


@bench.hookimpl
def register_attacks(register):
    register(InputAware)
