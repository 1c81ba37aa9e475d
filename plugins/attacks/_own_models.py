"""Networks an attack trains for itself from a model plugin chosen by option (`low_frequency`'s
clean surrogate, `label_consistent`'s adversarially trained model): built fresh from the job
seed and trained with that plugin's recipe. They are made inside `poison`, so what they lead to
is cached with the attacked model, keyed by the attack's options and code."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

import bench
from bench.toolkit import Classifier, build_plugin, channel_stats, train_classifier

# what `train_classifier(perturb=...)` applies to each augmented batch: (x, y, generator) -> x
BatchPerturbation = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


def model_plugin(name: str, width: int):
    """The model plugin `name` with its `width` option (0: the plugin's default); an unknown
    model or a bad width raises the suite error `check_dataset` should surface before a run."""
    return build_plugin("model", name, **({"width": width} if width else {}))


def train_own_model(
    plugin,
    train: bench.ImageData,
    ctx,
    *,
    stream: str,
    desc: str,
    epochs: int = 0,
    adversary: Callable[[nn.Module], BatchPerturbation] | None = None,
) -> nn.Module:
    """A fresh network of `plugin` behind the training set's normalisation, initialised from the
    job seed's `stream` without disturbing the caller's global generator, trained on `train` with
    the plugin's recipe (`epochs` of it when given); `adversary(model)`, if given, returns the
    perturbation `train_classifier` applies to each batch of that model (adversarial training).
    In eval mode."""
    recipe = dataclasses.replace(plugin.recipe, epochs=epochs) if epochs else plugin.recipe
    channels, height, width = train.x.shape[1:]
    with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
        ctx.seed_global_rng(stream)
        net = plugin.build(bench.InputShape(channels, height, width, ctx.num_classes))
        model = ctx.prepare(Classifier(net, *channel_stats(train.x)))
        perturb = adversary(model) if adversary is not None else None
        train_classifier(model, train, recipe, ctx, flip=ctx.horizontal_flip, stream=stream, desc=desc, perturb=perturb)
    return model.eval()
