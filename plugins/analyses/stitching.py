"""`stitching`: model stitching of robust and non-robust networks (Balogh & Jelasity, ICML 2023).

The front of network A up to layer L, a trainable stitching layer, and the back of network B
from L on; A and B frozen. The stitching layer is affine: a 1x1 convolution with bias (channel
to channel) on feature maps, a linear layer on flat features, initialised to the identity. It
is trained with cross-entropy on clean training images (Adam, lr `lr`, `epochs` epochs, lr
divided by 10 at 1/3 and 2/3 of training, batch `batch_size`). A's front is frozen, so its
activations are computed once per layer and the layer trains on them directly.

Models: `regular` and `robust` (PGD adversarial training, `robust_*` options) with the job's
seed, and `regular_b` and `robust_b` with the next seed. Pairs A -> B: robust -> regular,
regular -> robust, robust -> robust_b and regular -> regular_b (same kind, different seeds).
Stitchable layers: the model's network must be an `nn.Sequential` (as `small_cnn`'s is); L runs
over the outputs of its ReLUs and of its flattening. For each pair and L, on the first
`images` evaluation images: stitched clean accuracy and PGD robust accuracy (L-inf `eps`,
`pgd_steps` steps, through the whole stitched network), each also relative to B's own.

The paper's finding: clean accuracy stitches well at every layer; robust accuracy of the
stitched network drops soon after the first layers and returns in the last ones. The result
says whether this run shows both (`stitching_findings`, rules above it, with intervals).

Training follows the reference code (szegedai/robust-stitching, `find_transform.py` and
`trainer.py`): a randomly initialised layer (`init`), Adam with weight decay 1e-4, 30 epochs,
lr / 10 at 1/3 and 2/3, batch 128 with the last incomplete batch dropped, the whole training
set (`train_images` 0), and the donor networks' batch norm in train mode while the stitch trains
(`donor_batch_norm`; the reference's README advises against freezing it), so their running
statistics follow the stitched activations. The evaluation is PGD-20 (the reference code's; the
paper reports APGD), with a random start and step 2.5 eps / steps here (the reference: no random
start, step 2/255).
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import bench
from bench.toolkit import derived_seed, to_model_input, wilson_interval
from bench_plugins.analyses._measure import clean_and_pgd

# The rules by which a run "shows" the paper's findings (printed with the evidence in the report).
# The paper (Balogh & Jelasity, ICML 2023, abstract and Section 4): robust and non-robust
# representations "are compatible regarding accuracy"; "from the point of view of robust
# accuracy, compatibility decreases quickly after the first few layers but the representations
# become compatible again in the last layers". Here: clean accuracy stitches well where every
# stitched network keeps 90% of its back network's; robust accuracy of a robust/regular pair,
# relative to its back network's, drops where a layer's 95% interval lies below one half and
# returns where the last layer's lies above twice the low point's. Relative values are only
# formed against a back network whose robust accuracy is resolvable (95% Wilson interval above
# 5%); the intervals of a ratio take the conservative ends of both Wilson intervals.
CLEAN_KEPT = 0.9
ROBUST_DROP = 0.5
ROBUST_RETURN = 2.0
RESOLVABLE = 0.05


def relative_interval(stitched: float, back: float, images: int) -> tuple[float, float] | None:
    """Conservative 95% interval of stitched / back robust accuracy on `images` images each, or
    None when the back network's accuracy is not resolvably above `RESOLVABLE`."""
    s_low, s_high = wilson_interval(round(stitched * images), images)
    b_low, b_high = wilson_interval(round(back * images), images)
    if b_low <= RESOLVABLE:
        return None
    return s_low / b_high, s_high / b_low


def stitching_findings(records: list[dict], values: dict[str, float], own: dict, images: int) -> list[bench.Finding]:
    verdicts, evidence = [], []
    for front_name, back_name, pair in PAIRS[:2]:
        rows = [r for r in records if r["pair"] == pair]
        back = own[back_name]["robust_acc"]
        resolved = [relative_interval(r["robust_acc"], back, images) for r in rows]
        intervals = [i for i in resolved if i is not None]
        if len(intervals) < len(resolved):
            verdicts.append(False)
            low, high = wilson_interval(round(back * images), images)
            evidence.append(
                f"{pair}: the back network's robust accuracy {100 * back:.1f}% (95% interval {100 * low:.1f}-"
                f"{100 * high:.1f}%) is too low to divide by"
            )
            continue
        lowest = min(range(len(rows)), key=lambda i: rows[i]["rel_robust"])
        drops = intervals[lowest][1] < ROBUST_DROP
        returns = intervals[-1][0] >= ROBUST_RETURN * intervals[lowest][1]
        verdicts.append(drops and returns)
        evidence.append(
            f"{pair}: relative robust accuracy by layer "
            + ", ".join(f"{r['rel_robust']:.2f} [{lo:.2f}, {hi:.2f}]" for r, (lo, hi) in zip(rows, intervals))
        )
    return [
        bench.Finding(
            "Clean accuracy stitches well at every layer (Balogh & Jelasity, ICML 2023: robust and non-robust "
            "representations 'are compatible regarding accuracy').",
            values["rel_clean_min"] >= CLEAN_KEPT,
            f"lowest stitched clean accuracy {values['rel_clean_min']:.2f} of the back network's",
        ),
        bench.Finding(
            "Robust accuracy of a stitched robust/regular pair drops after the first layers and returns in the "
            "last ones (ibid.: 'compatibility decreases quickly after the first few layers but the representations "
            "become compatible again in the last layers').",
            all(verdicts),
            f"{images} images; " + "; ".join(evidence),
        ),
    ]


PAIRS = (
    ("robust", "regular", "robust -> regular"),
    ("regular", "robust", "regular -> robust"),
    ("robust", "robust_b", "robust -> robust"),
    ("regular", "regular_b", "regular -> regular"),
)


def stitch_points(model: nn.Module) -> list[int]:
    """Indices of the modules of `model.net` (an nn.Sequential) after which a stitching layer
    may go: every ReLU and every Flatten."""
    net = getattr(model, "net", None)
    if not isinstance(net, nn.Sequential):
        raise bench.BenchError(
            f"stitching needs a model whose network is an nn.Sequential (like small_cnn), not {type(net).__name__}"
        )
    return [i for i, m in enumerate(net) if isinstance(m, (nn.ReLU, nn.Flatten))]


class Front(nn.Module):
    """A's normalization and its modules up to and including `layer`."""

    def __init__(self, model: nn.Module, layer: int):
        super().__init__()
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", model.get_buffer("mean").clone())
        self.register_buffer("std", model.get_buffer("std").clone())
        self.layers = nn.Sequential(*list(model.get_submodule("net").children())[: layer + 1])

    def forward(self, x):
        return self.layers((x - self.mean) / self.std)


class Init(enum.Enum):
    RANDOM = "random"  # PyTorch's default initialisation of the layer (the reference's default)
    IDENTITY = "identity"


class DonorBatchNorm(enum.Enum):
    TRAIN = "train"  # the donors' batch norm in train mode while the stitch trains (the reference's default)
    FROZEN = "frozen"  # eval mode: running statistics fixed (the reference's --no-bn, "not recommended")


def stitching_layer(features: torch.Tensor, init: Init = Init.IDENTITY, seed: int = 0) -> nn.Conv2d | nn.Linear:
    """The affine stitching layer for these features (4D: 1x1 conv with bias; 2D: linear),
    initialised to the identity or, seeded, as PyTorch initialises such a layer."""
    channels = features.shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer: nn.Conv2d | nn.Linear = (
            nn.Conv2d(channels, channels, 1) if features.dim() == 4 else nn.Linear(channels, channels)
        )
    if init is Init.IDENTITY:
        with torch.no_grad():
            layer.weight.copy_(torch.eye(channels).view_as(layer.weight))
            if layer.bias is not None:
                layer.bias.zero_()
    return layer.to(features.device)


class Stitched(nn.Module):
    def __init__(self, front: nn.Module, stitch: nn.Module, back: nn.Module):
        super().__init__()
        self.front, self.stitch, self.back = front, stitch, back

    def forward(self, x):
        return self.back(self.stitch(self.front(x)))


def stitch(
    a: nn.Module,
    b: nn.Module,
    layer: int,
    train: bench.ImageData,
    ctx: bench.RunContext,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float = 1e-4,
    init: Init = Init.RANDOM,
    donor_batch_norm: DonorBatchNorm = DonorBatchNorm.TRAIN,
) -> Stitched:
    """A's front to `layer`, a trained affine stitching layer, B's back; A and B unchanged (their
    copies' batch-norm statistics follow the stitching data when `donor_batch_norm` is `train`,
    as in the reference's trainer, which puts the whole stitched network in train mode)."""
    front = Front(copy.deepcopy(a), layer).eval().requires_grad_(False)
    back_layers = list(copy.deepcopy(b).get_submodule("net").children())[layer + 1 :]
    back = nn.Sequential(*back_layers).eval().requires_grad_(False)
    with torch.no_grad(), ctx.autocast():
        sample = front(to_model_input(train.x[:2])).float()
    layer_module = stitching_layer(sample, init, seed=derived_seed(ctx.seed, f"stitch_init_{layer}"))
    optimizer = torch.optim.Adam(layer_module.parameters(), lr=lr, weight_decay=weight_decay)
    milestones = [m for m in (epochs // 3, 2 * epochs // 3) if m > 0]  # with 1-2 epochs, no drop before the first
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    generator = ctx.generator(f"stitch_{layer}")
    frozen = donor_batch_norm is DonorBatchNorm.FROZEN
    if frozen:  # A's front cannot change: its activations are computed once
        with torch.no_grad(), ctx.autocast():
            features = torch.cat(
                [
                    front(to_model_input(train.x[i : i + ctx.eval_batch_size])).float()
                    for i in range(0, len(train), ctx.eval_batch_size)
                ]
            )
    else:
        front.train()
        back.train()
    for _ in range(epochs):
        order = torch.randperm(len(train), device=train.y.device, generator=generator)
        # the reference drops the last incomplete batch (a batch of one breaks train-mode batch norm)
        stop = len(order) if frozen or len(order) <= batch_size else len(order) - len(order) % batch_size
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            if frozen:
                inputs = features[idx]
            else:
                with torch.no_grad(), ctx.autocast():
                    inputs = front(to_model_input(train.x[idx])).float()
            with ctx.autocast():
                logits = back(layer_module(inputs))
            loss = F.cross_entropy(logits.float(), train.y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
    return Stitched(front.eval(), layer_module.eval().requires_grad_(False), back.eval()).eval()


class Stitching(bench.Analysis):
    name = "stitching"
    description = "Stitch robust and regular networks at every layer: clean and PGD accuracy of the result"
    code = "https://github.com/szegedai/robust-stitching"

    @dataclass(frozen=True)
    class Options:
        epochs: int = bench.option(30, "epochs of stitching-layer training (lr / 10 at 1/3 and 2/3)", min=1)
        lr: float = bench.option(1e-3, "Adam learning rate", min=0, min_exclusive=True)
        weight_decay: float = bench.option(1e-4, "Adam weight decay (the reference's)", min=0)
        batch_size: int = bench.option(128, "images per step", min=1)
        train_images: int = bench.option(
            0, "clean training images the stitching layer learns on (0: all, as the reference)", min=0
        )
        init: Init = bench.option(Init.RANDOM, "stitching layer's initialisation: random (reference) or identity")
        donor_batch_norm: DonorBatchNorm = bench.option(
            DonorBatchNorm.TRAIN,
            "the donor networks' batch norm while the stitch trains: train mode (reference) or frozen",
        )
        robust_eps: float = bench.option(
            8 / 255, "L-inf budget of the robust models' PGD adversarial training", min=0, min_exclusive=True, max=1
        )
        robust_epochs: int = bench.option(30, "epochs of adversarial training", min=1)
        robust_images: int = bench.option(0, "training images for adversarial training (0: all)", min=0)
        eps: float = bench.option(8 / 255, "L-inf budget of the PGD evaluation", min=0, min_exclusive=True, max=1)
        pgd_steps: int = bench.option(
            20, "PGD steps of the evaluation (step 2.5 eps / steps; the reference's PGD-20)", min=1
        )
        images: int = bench.option(500, "evaluation images (0: all)", min=0)

    metrics = (
        bench.Metric(
            "robust_to_regular_rel_robust_min",
            "robust→regular: min rel. robust acc.",
            None,
            kind=bench.MetricKind.NUMBER,
        ),
        bench.Metric(
            "regular_to_robust_rel_robust_min",
            "regular→robust: min rel. robust acc.",
            None,
            kind=bench.MetricKind.NUMBER,
        ),
        bench.Metric("rel_clean_min", "min rel. clean acc. (all pairs)", None, kind=bench.MetricKind.NUMBER),
    )

    def check_model(self, model, sample):
        stitch_points(model)

    def models(self):
        o = self.options
        robust = {
            "defense": "adversarial_training",
            "bonafide_source": "train",
            "bonafide_size": o.robust_images,
            "options": {
                "method": "pgd",
                "eps": o.robust_eps,
                "step": o.robust_eps / 4,
                "steps": 10,
                "epochs": o.robust_epochs,
                "from_scratch": True,
            },
        }
        return {
            "regular": bench.ModelRecipe(),
            "regular_b": bench.ModelRecipe(seed_offset=1),
            "robust": bench.ModelRecipe(**robust),
            "robust_b": bench.ModelRecipe(seed_offset=1, **robust),
        }

    def run(self, models, data, ctx):
        o = self.options
        train = data.splits.train
        if o.train_images:
            train = train.subset(
                torch.randperm(len(train), generator=ctx.generator("stitch_images"), device=train.y.device)[
                    : o.train_images
                ]
            )
        evaluation = data.evaluation
        if o.images:
            evaluation = evaluation.subset(torch.arange(min(o.images, len(evaluation)), device=evaluation.y.device))
        own = {
            name: clean_and_pgd(model, evaluation, ctx, eps=o.eps, steps=o.pgd_steps, stream=f"own_{name}")
            for name, model in models.items()
        }
        layers = stitch_points(models["regular"])
        records = []
        for front_name, back_name, pair in PAIRS:
            for position, layer in enumerate(ctx.progress(layers, desc=f"stitching: {pair}")):
                stitched = stitch(
                    models[front_name],
                    models[back_name],
                    layer,
                    train,
                    ctx,
                    epochs=o.epochs,
                    lr=o.lr,
                    batch_size=o.batch_size,
                    weight_decay=o.weight_decay,
                    init=o.init,
                    donor_batch_norm=o.donor_batch_norm,
                )
                measured = clean_and_pgd(
                    stitched, evaluation, ctx, eps=o.eps, steps=o.pgd_steps, stream=f"stitched_{pair}_{layer}"
                )
                back = own[back_name]
                records.append(
                    {
                        "pair": pair,
                        "layer": position + 1,
                        "module": layer,
                        "clean_acc": measured["clean_acc"],
                        "robust_acc": measured["robust_acc"],
                        "rel_clean": measured["clean_acc"] / max(back["clean_acc"], 1e-12),
                        "rel_robust": measured["robust_acc"] / max(back["robust_acc"], 1e-12),
                    }
                )
        values = {
            "robust_to_regular_rel_robust_min": min(r["rel_robust"] for r in records if r["pair"] == PAIRS[0][2]),
            "regular_to_robust_rel_robust_min": min(r["rel_robust"] for r in records if r["pair"] == PAIRS[1][2]),
            "rel_clean_min": min(r["rel_clean"] for r in records),
        }
        series = {
            "stitched": records,
            "own": [
                {"model": name, **{k: v for k, v in m.items() if k in ("clean_acc", "robust_acc")}}
                for name, m in own.items()
            ],
        }
        figures = []
        for _, _, pair in PAIRS:  # one figure per pair type, from its own series
            series[f"stitched {pair}"] = [r for r in records if r["pair"] == pair]
            figures.append(
                bench.Figure(
                    f"stitched {pair}",
                    "layer",
                    ("clean_acc", "robust_acc"),
                    f"stitched accuracy: {pair}",
                    xlabel="stitching layer L (1: first)",
                )
            )
        return bench.AnalysisResult(
            values=values,
            series=series,
            figures=figures,
            findings=stitching_findings(records, values, own, len(evaluation)),
        )


@bench.hookimpl
def register_analyses(register):
    register(Stitching)
