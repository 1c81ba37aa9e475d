"""`robust_path`: paths between a regular and an adversarially trained model (Zhao, Chen, Das,
Ramamurthy & Lin, ICLR 2020, the evasion part of the MCR paper).

Two models of the same architecture and seed: `regular` (trained on clean data) and `robust`
(the regular model's architecture trained by the `adversarial_training` defense with PGD on
`robust_images` training images; from scratch by default, on that defense's SGD schedule, not
the paper's). A curve between them is trained on
clean training images with MCR's curve code (`curve`: Bezier or polygonal chain; the reference's
budget is `epochs` of `samples_per_epoch` samples); the straight line between them is the
baseline path. At each of `path_points` points t of both paths, on the evaluation images:

- clean loss and accuracy; PGD loss and robust accuracy (L-inf `eps`, `pgd_steps` steps);
- the largest eigenvalue of the Hessian of the loss with respect to the input, per image by
  power iteration on Hessian-vector products, averaged over the first `hessian_images` images.
  The products are forward-over-reverse (`torch.func.jvp` of `torch.func.grad`), all images at
  once: an image's loss depends on its own input only (eval mode), so the Hessian of the summed
  loss is block-diagonal and one product serves every image. For ReLU networks the input
  Hessian of cross-entropy is J^T H_softmax J, positive semi-definite, so the power iteration's
  dominant eigenvalue is the largest. `power_iterations` iterations; the stored
  `hessian_residual` is the largest relative change of an image's estimate in the last
  iteration (converged when small).

Batch-norm statistics at each point are recomputed on the curve's training images, as MCR does.
Values: the Pearson correlation between the eigenvalue and the PGD loss along each path
(`pearson_curve`, `pearson_line`), the correlation of their step-to-step changes along the curve
and its permutation p-value (`pearson_steps_curve`, `correlation_p_curve`), and the barrier in
PGD loss along the curve (its largest value minus the larger endpoint's; the paper finds one)
with its 95% bootstrap interval over the evaluation images. The findings' rules are the module
constants below.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import bench
from bench.toolkit import REFERENCE_SAMPLES_PER_EPOCH, detrended_correlation, permutation_p_value, to_model_input
from bench_plugins.analyses._measure import clean_and_pgd_per_image
from bench_plugins.defenses.mcr import Curve, ParameterCurve, curve_point, recompute_batchnorm, train_curve


def input_hessian_top_eigenvalues(
    loss_sum, x: torch.Tensor, iterations: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, float]:
    """Per image of x [N, ...], the dominant eigenvalue of the Hessian of its loss with respect
    to its input, by power iteration on Hessian-vector products; `loss_sum(x)` is the sum of the
    per-image losses (each depending on its own image only). Returns (eigenvalues [N], the
    largest relative change of an estimate in the last iteration)."""
    grad = torch.func.grad(loss_sum)

    def hvp(v: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(grad, (x,), (v,))[1]

    def normalized(v: torch.Tensor) -> torch.Tensor:
        return v / v.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *[1] * (v.dim() - 1))

    v = normalized(torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator))
    eigenvalues = torch.zeros(len(x), device=x.device, dtype=x.dtype)
    change = torch.full((len(x),), float("inf"), device=x.device)
    for _ in range(iterations):
        hv = hvp(v)
        estimate = (hv * v).flatten(1).sum(dim=1)  # Rayleigh quotient, ||v|| = 1
        change = (estimate - eigenvalues).abs() / estimate.abs().clamp_min(1e-12)
        eigenvalues = estimate
        v = normalized(hv)
    return eigenvalues.detach(), float(change.detach().max()) if len(x) else 0.0


def pearson(a: list[float], b: list[float]) -> float:
    """Pearson's correlation coefficient; NaN when either side is constant."""
    a_, b_ = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    a_, b_ = a_ - a_.mean(), b_ - b_.mean()
    denominator = np.sqrt((a_**2).sum() * (b_**2).sum())
    return float((a_ * b_).sum() / denominator) if denominator > 0 else float("nan")


# The rules by which a run "shows" the paper's findings (printed with the evidence in the report).
# Barrier (Zhao et al., ICLR 2020, Figure 5): the curve's highest PGD loss exceeds the worse end's
# by 5% of it, and the barrier's 95% bootstrap interval over the evaluation images excludes 0.
# Correlation (ibid., Figure 6): the eigenvalue's and the PGD loss's step-to-step changes along
# the curve correlate (a one-sided permutation test at 0.05): any two monotone curves have a
# high Pearson r of their levels, so the levels alone show nothing.
BARRIER_SHARE = 0.05
CORRELATION_LEVEL = 0.05
BOOTSTRAP_RESAMPLES = 1000


def loss_barrier(rows: list[dict]) -> float:
    """The PGD-loss barrier of a path: its highest loss minus the higher of its two ends."""
    return max(r["adv_loss"] for r in rows) - max(rows[0]["adv_loss"], rows[-1]["adv_loss"])


def barrier_interval(per_image: torch.Tensor, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES):
    """The 95% percentile-bootstrap interval of a path's loss barrier, from per-image losses
    [points, images] on the same images at every point: images are resampled with replacement,
    the same draw for every point."""
    generator = torch.Generator().manual_seed(seed)
    images = per_image.shape[1]
    draws = torch.randint(0, images, (resamples, images), generator=generator)
    means = per_image.double()[:, draws].mean(dim=2)  # [points, resamples]
    barriers = means.max(dim=0).values - torch.maximum(means[0], means[-1])
    low, high = torch.quantile(barriers, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return low, high


def correlation_test(eigenvalues: list[float], losses: list[float]) -> tuple[float, float]:
    """(Pearson r of the two sequences' steps along the path, its one-sided permutation p-value)."""
    return detrended_correlation(eigenvalues, losses), permutation_p_value(eigenvalues, losses)


def path_findings(records: list[dict], values: dict[str, float]) -> list[bench.Finding]:
    curve = [r for r in records if r["path"] == "curve"]
    line = [r for r in records if r["path"] == "line"]
    worse_end = max(curve[0]["adv_loss"], curve[-1]["adv_loss"])
    barrier, low, high = values["adv_loss_barrier"], values["adv_loss_barrier_low"], values["adv_loss_barrier_high"]
    return [
        bench.Finding(
            "Along the trained path between a regular and a robust model the adversarial (PGD) loss has a barrier "
            "(Zhao et al., ICLR 2020, Figure 5).",
            barrier > BARRIER_SHARE * worse_end and low > 0,
            f"barrier {barrier:.2f} on the curve (95% bootstrap interval over images {low:.2f} to {high:.2f}) and "
            f"{loss_barrier(line):.2f} on the line; PGD loss at the ends {curve[0]['adv_loss']:.2f} (regular) and "
            f"{curve[-1]['adv_loss']:.2f} (robust)",
        ),
        bench.Finding(
            "The top eigenvalue of the input Hessian correlates with the adversarial loss along the path "
            "(ibid., Figure 6).",
            values["correlation_p_curve"] < CORRELATION_LEVEL,
            f"step-to-step r {values['pearson_steps_curve']:.2f} on the curve, permutation p = "
            f"{values['correlation_p_curve']:.2g} (level {CORRELATION_LEVEL:g}); Pearson r of the levels "
            f"{values['pearson_curve']:.2f} on the curve, {values['pearson_line']:.2f} on the line",
        ),
    ]


class RobustPath(bench.Analysis):
    name = "robust_path"
    description = "Paths between a regular and an adversarially trained model: accuracy, PGD loss, input-Hessian"
    paper = "https://openreview.net/forum?id=SJgwzCEKwH"
    code = "https://github.com/IBM/model-sanitization"

    @dataclass(frozen=True)
    class Options:
        curve: Curve = bench.option(Curve.BEZIER, "curve shape: 3-bend quadratic Bezier (paper) or polygonal chain")
        epochs: int = bench.option(
            100, "epochs of samples_per_epoch samples to train the curve (reference: 100)", min=1
        )
        samples_per_epoch: int = bench.option(
            REFERENCE_SAMPLES_PER_EPOCH, "samples per curve epoch; 0: one pass", min=0
        )
        curve_images: int = bench.option(0, "clean training images the curve trains on (0: all)", min=0)
        lr: float = bench.option(
            0.01, "curve lr (SGD, momentum 0.9, the reference's schedule)", min=0, min_exclusive=True
        )
        weight_decay: float = bench.option(1e-4, "explicit L2 term on the curve's weights", min=0)
        batch_size: int = bench.option(128, "curve images per step, each step with its own t", min=1)
        path_points: int = bench.option(
            11, "evenly spaced points t = 0..1 on each path (at least 3: the correlation test needs 2 steps)", min=3
        )
        robust_eps: float = bench.option(
            8 / 255, "L-inf budget of the robust model's PGD adversarial training", min=0, min_exclusive=True, max=1
        )
        robust_epochs: int = bench.option(30, "epochs of adversarial training (of robust_images images)", min=1)
        robust_images: int = bench.option(0, "training images for adversarial training (0: all)", min=0)
        robust_from_scratch: bool = bench.option(
            True,
            "adversarially train from fresh weights (as the paper's robust model); false: fine-tune the regular model",
        )
        eps: float = bench.option(8 / 255, "L-inf budget of the PGD evaluation", min=0, min_exclusive=True, max=1)
        pgd_steps: int = bench.option(10, "PGD steps of the evaluation (step 2.5 eps / steps)", min=1)
        images: int = bench.option(1000, "evaluation images (0: all)", min=0)
        hessian_images: int = bench.option(100, "images the Hessian eigenvalue is averaged over", min=1)
        power_iterations: int = bench.option(20, "power iterations per image and point", min=2)

    metrics = (
        bench.Metric("pearson_curve", "Pearson r (curve)", None, kind=bench.MetricKind.NUMBER),
        bench.Metric("pearson_line", "Pearson r (line)", None, kind=bench.MetricKind.NUMBER),
        bench.Metric("adv_loss_barrier", "PGD-loss barrier (curve)", None, kind=bench.MetricKind.NUMBER),
        bench.Metric("adv_loss_barrier_low", "Barrier, 95% bootstrap low", None, kind=bench.MetricKind.NUMBER),
        bench.Metric("adv_loss_barrier_high", "Barrier, 95% bootstrap high", None, kind=bench.MetricKind.NUMBER),
        bench.Metric("pearson_steps_curve", "Step-to-step r (curve)", None, kind=bench.MetricKind.NUMBER),
        bench.Metric("correlation_p_curve", "Permutation p of step r (curve)", None, kind=bench.MetricKind.NUMBER),
        bench.Metric(
            "hessian_residual", "Power-iteration residual (max)", None, kind=bench.MetricKind.NUMBER, diagnostic=True
        ),
    )

    def models(self):
        o = self.options
        return {
            "regular": bench.ModelRecipe(),
            "robust": bench.ModelRecipe(
                defense="adversarial_training",
                bonafide_source="train",
                bonafide_size=o.robust_images,
                options={
                    "method": "pgd",
                    "eps": o.robust_eps,
                    "step": o.robust_eps / 4,
                    "steps": 10,
                    "epochs": o.robust_epochs,
                    "from_scratch": o.robust_from_scratch,
                },
            ),
        }

    def run(self, models, data, ctx):
        o = self.options
        regular, robust = models["regular"], models["robust"]
        train = data.splits.train
        if o.curve_images:
            train = train.subset(
                torch.randperm(len(train), generator=ctx.generator("curve_images"), device=train.y.device)[
                    : o.curve_images
                ]
            )
        evaluation = (
            data.evaluation
            if not o.images
            else data.evaluation.subset(
                torch.arange(min(o.images, len(data.evaluation)), device=data.evaluation.y.device)
            )
        )
        curve = ParameterCurve(regular, robust, o.curve)
        net = copy.deepcopy(regular)
        losses = train_curve(
            net,
            curve,
            train,
            ctx,
            epochs=o.epochs,
            samples_per_epoch=o.samples_per_epoch,
            lr=o.lr,
            momentum=0.9,
            weight_decay=o.weight_decay,
            batch_size=o.batch_size,
            stream="robust_path",
            desc="robust_path: train curve",
        )
        ts = [round(i / (o.path_points - 1), 6) for i in range(o.path_points)]
        hessian_x = to_model_input(evaluation.x[: o.hessian_images])
        hessian_y = evaluation.y[: o.hessian_images]
        records, residual = [], 0.0
        adversarial_losses: dict[str, list[torch.Tensor]] = {"curve": [], "line": []}
        for path in ("curve", "line"):
            for t in ctx.progress(ts, desc=f"robust_path: {path}"):
                point = self._point(net, regular, robust, curve, path, t, train, ctx)
                measured, per_image = clean_and_pgd_per_image(
                    point, evaluation, ctx, eps=o.eps, steps=o.pgd_steps, stream=f"pgd_{t}"
                )
                adversarial_losses[path].append(per_image)
                eigenvalues, change = input_hessian_top_eigenvalues(
                    lambda x: F.cross_entropy(point(x).float(), hessian_y, reduction="sum"),
                    hessian_x,
                    o.power_iterations,
                    ctx.generator(f"hessian_{t}"),
                )
                residual = max(residual, change)
                records.append({"path": path, "t": t, **measured, "hessian_eig": float(eigenvalues.mean())})
        values = {"hessian_residual": residual}
        for path in ("curve", "line"):
            rows = [r for r in records if r["path"] == path]
            values[f"pearson_{path}"] = pearson([r["hessian_eig"] for r in rows], [r["adv_loss"] for r in rows])
        curve_rows = [r for r in records if r["path"] == "curve"]
        values["pearson_steps_curve"], values["correlation_p_curve"] = correlation_test(
            [r["hessian_eig"] for r in curve_rows], [r["adv_loss"] for r in curve_rows]
        )
        values["adv_loss_barrier"] = loss_barrier(curve_rows)
        values["adv_loss_barrier_low"], values["adv_loss_barrier_high"] = barrier_interval(
            torch.stack(adversarial_losses["curve"]), seed=ctx.seed
        )
        findings = path_findings(records, values)
        figures = [
            bench.Figure(
                "points",
                "t",
                ("clean_acc", "robust_acc"),
                "accuracy along the paths",
                group="path",
                xlabel="t (0: regular, 1: robust)",
            ),
            bench.Figure(
                "points",
                "t",
                ("clean_loss", "adv_loss"),
                "loss along the paths",
                group="path",
                percent=False,
                xlabel="t (0: regular, 1: robust)",
                ylabel="cross-entropy",
            ),
            bench.Figure(
                "points",
                "t",
                ("hessian_eig",),
                "top input-Hessian eigenvalue",
                group="path",
                percent=False,
                xlabel="t (0: regular, 1: robust)",
                ylabel="eigenvalue",
            ),
        ]
        series = {"points": records, "curve_training": [{"epoch": i + 1, "loss": v} for i, v in enumerate(losses)]}
        return bench.AnalysisResult(values=values, series=series, figures=figures, findings=findings)

    @staticmethod
    def _point(
        net: nn.Module,
        regular: nn.Module,
        robust: nn.Module,
        curve: ParameterCurve,
        path: str,
        t: float,
        train: bench.ImageData,
        ctx: bench.RunContext,
    ) -> nn.Module:
        if path == "curve":
            return curve_point(net, curve, t, train, ctx)
        point = copy.deepcopy(regular)
        with torch.no_grad():
            robust_params = dict(robust.named_parameters())
            for name, p in point.named_parameters():
                p.copy_((1 - t) * p + t * robust_params[name])
        recompute_batchnorm(point, train, ctx)
        return point


@bench.hookimpl
def register_analyses(register):
    register(RobustPath)
