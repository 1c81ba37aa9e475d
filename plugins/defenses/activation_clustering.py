"""`activation_clustering`: Activation Clustering (Chen et al., 2018), through the Adversarial
Robustness Toolbox (ART, `art.defences.detector.poison.ActivationDefence`).

A backdoored model represents the poisoned images of its target class differently from the
clean ones, so the activations of each class, reduced to a few dimensions, fall into two
clusters, and the poisoned images form one of them. Step by step:

1. train the freshly initialised model on the poisoned training set with the model family's
   recipe, as the attacker's training would (`epochs`, 0: the recipe's);
2. run ART's `ActivationDefence` on the training set with that model: per class (the labels as
   poisoned), the activations of the last hidden layer, reduced by `reduce` (PCA) to `nb_dims`
   (10) dimensions, are split by k-means into `nb_clusters` (2) clusters; `cluster_analysis`
   ("smaller") flags the smaller cluster of every class as poisoned;
3. remove the flagged images and train the untrained model again (the very initialisation it
   came with, a copy kept before step 1) on the rest; return it with the removed indices, which
   the core scores as detection TPR, FPR and precision against the poisoned images.

Defaults are ART 1.20's own (`ActivationDefence.__init__` and `detect_poison`): 2 clusters, 10
dimensions, PCA, "smaller". Note that "smaller" flags the smaller cluster of every class, clean
classes included, so about a fifth to a half of each clean class is removed as well (the paper
decides per class by relative size or silhouette score: "silhouette-scores" here; ART 1.20's
"relative-size" fails with a numpy truth-value error on a class without exactly one small
cluster, and its "TSNE" reduction raises, so neither is offered); and that when the poisoned
images are as many as the target class's clean ones (10% poisoning with 10 classes) "smaller"
is a coin toss in the target class: on the digits test set it removes the clean images of the
target class and none of the poisoned ones.

Why not ART's layer choice as it stands: ART takes the activations of the last entry of
`PyTorchClassifier.layer_names`, which for a PyTorch model are its top-level children; for our
models (a `Classifier` whose only child is `net`) that is the logits, not the last hidden layer
the paper (and ART's Keras wrapper) use. So ART gets a copy of the model whose classification
head, the last `nn.Linear` to run, whose output is the model's output, is replaced by
`nn.Identity`: the "logits" ART reads are then the head's input, the last hidden layer. ART's
k-means and PCA draw from numpy's global generator; it is seeded from the job's seed for the
call and restored after, so a rerun flags the same images.

The two trainings use the recipe's budget each. `pip install 'robustness-bench[art]'` installs ART;
it is imported only when the defense runs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

import bench
from bench.toolkit import derived_seed, to_model_input, train_classifier

# (ART classifier over the last hidden layer, images as float [0, 1] NCHW, labels) -> is_clean per image
Detector = Callable[[Any, np.ndarray, np.ndarray], list[int]]


def import_art(defense: str):
    """The `art` package, or a `BenchError` saying how to install it."""
    try:
        import art
    except ImportError as error:
        raise bench.BenchError(
            f"{defense} needs the Adversarial Robustness Toolbox: pip install 'robustness-bench[art]'"
        ) from error
    return art


@torch.no_grad()
def classification_head(model: nn.Module, sample: torch.Tensor, defense: str) -> str:
    """The name of the model's classification head: the last `nn.Linear` to run, provided its
    output is the model's output."""
    outputs: list[tuple[str, torch.Tensor]] = []
    hooks = [
        module.register_forward_hook(lambda m, args, out, name=name: outputs.append((name, out)))
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]
    try:
        logits = model.eval()(sample)
    finally:
        for hook in hooks:
            hook.remove()
    if not outputs or not torch.equal(outputs[-1][1], logits):
        raise bench.BenchError(
            f"{defense}: the model's output is not that of an nn.Linear head, so its last hidden "
            "layer (the head's input) cannot be found"
        )
    return outputs[-1][0]


def last_hidden_layer_model(model: nn.Module, sample: torch.Tensor, defense: str) -> nn.Module:
    """A copy of `model` whose output is its last hidden layer: the head replaced by nn.Identity."""
    head = classification_head(model, sample, defense)
    features = copy.deepcopy(model).eval()
    parent, _, child = head.rpartition(".")
    setattr(features.get_submodule(parent), child, nn.Identity())
    return features


@contextlib.contextmanager
def numpy_seeded(seed: int) -> Iterator[None]:
    """Seed numpy's global generator (ART's k-means and PCA draw from it) and restore it after."""
    state = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        np.random.set_state(state)


def art_flags(model: nn.Module, train: bench.ImageData, ctx: bench.DefenseContext, defense: str, detect: Detector):
    """Run an ART poison detector over `train` with the last hidden layer of `model`; returns a
    bool tensor on the device, True for each image it flags as poisoned."""
    import_art(defense)
    from art.estimators.classification import PyTorchClassifier

    images = to_model_input(train.x[:2])
    features = last_hidden_layer_model(model, images, defense)
    on_gpu = ctx.device.type == "cuda"
    with torch.cuda.device(ctx.device) if on_gpu else contextlib.nullcontext():
        classifier = PyTorchClassifier(
            model=features,
            loss=nn.CrossEntropyLoss(),
            input_shape=tuple(train.x.shape[1:]),
            nb_classes=ctx.num_classes,
            clip_values=(0.0, 1.0),
            device_type="gpu" if on_gpu else "cpu",
        )
    x = torch.cat(
        [to_model_input(train.x[i : i + ctx.eval_batch_size]).cpu() for i in range(0, len(train), ctx.eval_batch_size)]
    ).numpy()
    with numpy_seeded(derived_seed(ctx.seed, defense)):
        is_clean = detect(classifier, x, train.y.cpu().numpy())
    return torch.tensor(is_clean, device=train.y.device) == 0


def filter_and_retrain(
    model: nn.Module, train: bench.ImageData, ctx: bench.DefenseContext, epochs: int, defense: str, detect: Detector
) -> bench.Defended:
    """Train `model` on the poisoned set, remove what `detect` flags, train the untrained model
    again on the rest. The series `removed_per_class` counts the removed images per label."""
    import_art(defense)  # before training, not after
    untrained = copy.deepcopy(model)
    recipe = dataclasses.replace(ctx.recipe, epochs=epochs or ctx.recipe.epochs)
    train_classifier(
        model, train, recipe, ctx, flip=ctx.horizontal_flip, stream=f"{defense}:poisoned", desc=f"{defense}: train"
    )
    flagged = art_flags(model, train, ctx, defense, detect)
    train_classifier(
        untrained,
        train.subset((~flagged).nonzero().squeeze(1)),
        recipe,
        ctx,
        flip=ctx.horizontal_flip,
        stream=f"{defense}:filtered",
        desc=f"{defense}: retrain",
    )
    removed = torch.bincount(train.y[flagged], minlength=ctx.num_classes).tolist()
    images = torch.bincount(train.y, minlength=ctx.num_classes).tolist()
    series = {
        "removed_per_class": [
            {"label": label, "removed": count, "images": total}
            for label, (count, total) in enumerate(zip(removed, images))
        ]
    }
    return bench.Defended(untrained.eval(), series=series, removed_training_indices=flagged.nonzero().squeeze(1))


class Reduce(enum.Enum):
    PCA = "PCA"
    FAST_ICA = "FastICA"
    # ART 1.20 lists "TSNE" as valid, but its reduce_dimensionality raises for it


class ClusterAnalysis(enum.Enum):
    SMALLER = "smaller"
    DISTANCE = "distance"
    SILHOUETTE_SCORES = "silhouette-scores"
    # ART 1.20's "relative-size" fails on any class without exactly one small cluster (its
    # report tests `cluster_id in np.where(...)`, ambiguous for an empty or two-element array)


class ActivationClustering(bench.Defense):
    name = "activation_clustering"
    description = "Activation Clustering (ART): remove each class's smaller activation cluster, retrain"
    paper = "https://arxiv.org/abs/1811.03728"
    code = "https://github.com/Trusted-AI/adversarial-robustness-toolbox"
    defender_data = bench.DefenderData.POISONED_TRAINING_SET

    @dataclass(frozen=True)
    class Options:
        epochs: int = bench.option(
            0, "epochs of each training (on the poisoned set, then on the rest); 0: the model's recipe", min=0
        )
        nb_clusters: int = bench.option(2, "k-means clusters per class (ART's default)", min=2)
        nb_dims: int = bench.option(10, "dimensions the activations are reduced to (ART's default)", min=1)
        reduce: Reduce = bench.option(Reduce.PCA, "dimensionality reduction (ART's default: PCA)")
        cluster_analysis: ClusterAnalysis = bench.option(
            ClusterAnalysis.SMALLER, "which clusters are poisoned (ART's default: the smaller of each class)"
        )

    def check_model(self, model, sample):
        classification_head(model, sample, self.name)

    def apply(self, model, train, ctx):
        o = self.options

        def detect(classifier, x, y) -> list[int]:
            from art.defences.detector.poison import ActivationDefence

            _, is_clean = ActivationDefence(classifier, x, y).detect_poison(
                nb_clusters=o.nb_clusters,
                nb_dims=o.nb_dims,
                reduce=o.reduce.value,
                cluster_analysis=o.cluster_analysis.value,
            )
            return is_clean

        return filter_and_retrain(model, train, ctx, o.epochs, self.name, detect)


@bench.hookimpl
def register_defenses(register):
    register(ActivationClustering)
