"""`wanet`: WaNet, the warping-based backdoor (Nguyen & Tran, ICLR 2021, "WaNet - Imperceptible
Warping-based Backdoor Attack"). The attacker is the trainer: it controls every training batch.

The trigger is a fixed, smooth warp of the whole image, not a patch:
1. In `poison`, a k x k control grid of 2-D offsets is drawn uniformly in [-1, 1] (from the job
   seed's `wanet` stream, so the warp is fixed per attack seed) and divided by its mean absolute
   value; it is upsampled bicubically (align_corners) to the image size, scaled by s / size
   (height for vertical, width for horizontal offsets: the reference's s / input_height on its
   square images), added to the identity sampling grid, multiplied by `grid_rescale` and
   clamped to [-1, 1]. `poison` returns the training set unchanged and the state {"grid",
   "control_grid", "poisoned_indices" (empty: no training image is poisoned once and for all)}.
2. In `training_batch`, each augmented float batch of B images gets, like the reference's
   `train_step`: its first int(poison_rate * B) images warped with the grid (bilinear
   `grid_sample`, align_corners) and relabelled (all-to-one: `target_class`; all-to-all:
   (y + 1) mod K); the next int(that * cross_ratio) images warped with the grid plus
   per-pixel uniform noise in [-1, 1] / size (the "noise mode", clamped) keeping their labels;
   the rest clean. The core shuffles every epoch, so the first images of a batch are random
   ones. When poison_rate * B < 1 the reference poisons one image with probability
   poison_rate * B (`generalize_to_lower_pratio`): done here with a mask drawn on the device.
3. `evaluate` warps the float test images (never rounded to uint8) and calls the model on them:
   all-to-one ASR is the share of non-target test images classified as the target, RA the share
   kept at their class; all-to-all counts every test image against (y + 1) mod K (WaNet's own
   code mapped y -> y mod K, i.e. to itself: BackdoorBench issue #18). "Noise-mode accuracy"
   (diagnostic) is the clean accuracy on noise-warped test images, BackdoorBench's cross
   accuracy: a low value means the network learned "any warp", not this warp.

Defaults, from BackdoorBench `config/attack/wanet/default.yaml` (and `attack/wanet.py`): pratio
0.1 (`poison_rate` here), cross_ratio 2, k 4, s 0.5, grid_rescale 1, target 0, all2one; the
paper's CIFAR-10 setting is the same (k 4, s 0.5, rho_a 0.1, rho_n 0.2).

Deviations: the reference augments (random crop 5, rotation 10, flip) after warping, with its
own transforms; here the core's recipe augments each batch before `training_batch`, so the
recipe, budget and cache stay the core's. The reference warps normalised tensors; warping
[0, 1] images is the same because the grid stays inside [-1, 1], where bilinear sampling is a
convex combination and commutes with per-channel normalisation. The control grid comes from a
generator on the job's device (as every draw of a job), so a CPU and a GPU run of the same seed
draw different, equally distributed warps. `poison_rate * (1 + cross_ratio)` may not exceed 1
(the reference would fail on such a batch); this is checked when the suite is read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import bench
from bench import Attack, ImageData, Metric, MetricKind, Stage
from bench.toolkit import accuracy, eval_mode, to_model_input
from bench_plugins.attacks.trigger_backdoor import TargetMode, TargetModes, batch_shares, check_batch_shares

GRID_STREAM = "wanet"
EVAL_NOISE_STREAM = "wanet_noise_eval"


def control_grid(k: int, generator: torch.Generator) -> torch.Tensor:
    """WaNet's control points [1, 2, k, k]: uniform in [-1, 1], divided by their mean absolute
    value (so that mean |offset| is 1), drawn on the generator's device."""
    points = torch.rand(1, 2, k, k, generator=generator, device=generator.device) * 2 - 1
    return points / points.abs().mean()


def identity_grid(height: int, width: int, device) -> torch.Tensor:
    """The sampling grid [1, H, W, 2] (x, y in [-1, 1]) that `grid_sample` maps to the image itself."""
    ys = torch.linspace(-1, 1, height, device=device)
    xs = torch.linspace(-1, 1, width, device=device)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((x, y), dim=2)[None]


def displacement(control: torch.Tensor, height: int, width: int, s: float) -> torch.Tensor:
    """The warp's offsets [1, H, W, 2] in grid units before clamping: the control grid
    upsampled bicubically to the image, times s / height (vertical) and s / width (horizontal)."""
    field = F.interpolate(control, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    return field * (s / torch.tensor([width, height], dtype=field.dtype, device=field.device))


def warp_grid(control: torch.Tensor, height: int, width: int, s: float, grid_rescale: float) -> torch.Tensor:
    """The fixed backdoor grid [1, H, W, 2]: (identity + displacement) * grid_rescale, clamped."""
    grid = identity_grid(height, width, control.device) + displacement(control, height, width, s)
    return (grid * grid_rescale).clamp(-1, 1)


def warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Float images [N, C, H, W] sampled at `grid` ([1 or N, H, W, 2]), bilinear, align_corners."""
    grid = grid.to(x.dtype).expand(len(x), -1, -1, -1)
    return F.grid_sample(x, grid, mode="bilinear", align_corners=True)


def noisy_grid(grid: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` copies of `grid` each plus per-pixel uniform noise in [-1, 1] / size (the noise
    mode), clamped to [-1, 1]."""
    _, height, width, _ = grid.shape
    noise = torch.rand(count, height, width, 2, generator=generator, device=grid.device) * 2 - 1
    scale = torch.tensor([width, height], dtype=grid.dtype, device=grid.device)
    return (grid + noise / scale).clamp(-1, 1)


class WaNet(TargetModes, Attack):
    name = "wanet"
    description = "WaNet: a fixed smooth warp of the whole image as trigger, trained with noise-mode warps"
    paper = "https://arxiv.org/abs/2102.10369"
    code = "https://github.com/VinAIResearch/Warping-based_Backdoor_Attack-release"
    stage = Stage.TRAINING
    controls_training = True
    metrics = (
        Metric("asr", "ASR", higher_is_better=False, doc="attack success rate"),
        Metric("ra", "RA", higher_is_better=True, doc="robust accuracy on triggered inputs"),
        Metric(
            "noise_accuracy",
            "Noise-mode acc",
            higher_is_better=None,
            kind=MetricKind.PERCENT,
            diagnostic=True,
            doc="WaNet: accuracy on test images warped with the trigger plus per-pixel noise (labels kept)",
        ),
    )
    success_metric = "asr"

    @dataclass(frozen=True)
    class Options:
        poison_rate: float = bench.option(
            0.1, "share of every training batch warped and relabelled (BackdoorBench's pratio 0.1)", min=0, max=1
        )
        target_class: int = bench.option(0, "class every warped image is relabelled to (all-to-one)", min=0)
        target_mode: TargetMode = bench.option(
            TargetMode.ALL_TO_ONE,
            "all_to_one: warped images get target_class; all_to_all: label y becomes (y + 1) mod classes",
        )
        cross_ratio: float = bench.option(
            2.0, "noise-mode images per warped image, labels kept (BackdoorBench 2: rho_n = 2 rho_a)", min=0
        )
        k: int = bench.option(4, "control grid size k x k (BackdoorBench and the paper: 4)", min=2)
        s: float = bench.option(
            0.5,
            "warp strength: offsets are s / image size grid units per unit of control grid (0.5)",
            min=0,
            min_exclusive=True,
        )
        grid_rescale: float = bench.option(
            1.0, "factor on the warped grid before clamping (BackdoorBench 1)", min=0, min_exclusive=True
        )

        def __post_init__(self):
            check_batch_shares(self.poison_rate, self.cross_ratio)

    def check_dataset(self, splits):
        self._check_target(splits.num_classes)

    def poison(self, train, ctx):
        self._check_target(ctx.num_classes)
        o = self.options
        _, _, height, width = train.x.shape
        control = control_grid(o.k, ctx.generator(GRID_STREAM))
        state = {
            "grid": warp_grid(control, height, width, o.s, o.grid_rescale),
            "control_grid": control,
            "poisoned_indices": torch.empty(0, dtype=torch.long, device=train.x.device),
        }
        return train, state

    def batch_counts(self, batch_size: int) -> tuple[int, int, bool]:
        """(warped, noise-mode, gated) for a batch (see `batch_shares`)."""
        return batch_shares(self.options.poison_rate, self.options.cross_ratio, batch_size)

    def training_batch(self, model, x, y, generator, ctx, state):
        warped, noise, gated = self.batch_counts(len(x))
        if warped == 0:
            return x, y
        grid = state["grid"]
        x, y = x.clone(), y.clone()
        new_x = warp(x[:warped], grid)
        new_y = self.poisoned_labels(y[:warped], ctx.num_classes)
        if noise:
            new_x = torch.cat([new_x, warp(x[warped : warped + noise], noisy_grid(grid, noise, generator))])
            new_y = torch.cat([new_y, y[warped : warped + noise]])
        if gated:  # pratio * B < 1: this batch is poisoned with probability pratio * B
            chosen = torch.rand((), generator=generator, device=x.device) < self.options.poison_rate * len(x)
            new_x = torch.where(chosen, new_x, x[: warped + noise])
            new_y = torch.where(chosen, new_y, y[: warped + noise])
        x[: warped + noise], y[: warped + noise] = new_x, new_y
        return x, y

    def _predict(self, model, images: torch.Tensor, grid: torch.Tensor, ctx) -> torch.Tensor:
        """Classes predicted for uint8 images warped (as floats) at `grid` ([1 or N, H, W, 2])."""
        outputs = []
        with torch.no_grad(), eval_mode(model), ctx.autocast():
            for start in range(0, len(images), ctx.eval_batch_size):
                chunk = to_model_input(images[start : start + ctx.eval_batch_size])
                chunk_grid = grid if len(grid) == 1 else grid[start : start + len(chunk)]
                outputs.append(model(warp(chunk, chunk_grid)).argmax(dim=1))
        return torch.cat(outputs) if outputs else torch.empty(0, dtype=torch.long, device=images.device)

    def evaluate(self, model, test: ImageData, ctx, state):
        self._check_target(ctx.num_classes)
        grid = state["grid"].to(test.x.device)
        noisy = self._predict(model, test.x, noisy_grid(grid, len(test), ctx.generator(EVAL_NOISE_STREAM)), ctx)
        noise_accuracy = accuracy(noisy, test.y)
        scores = self.scored(lambda images: self._predict(model, images, grid, ctx), test, ctx.num_classes)
        return {**scores, "noise_accuracy": noise_accuracy}


@bench.hookimpl
def register_attacks(register):
    register(WaNet)
