"""`nad`: Neural Attention Distillation (Li, Lyu, Koren, Lyu, Li & Ma, ICLR 2021).

A teacher is made by fine-tuning (a copy of) the attacked model on the bonafide images; the
attacked model is then trained as a student on the same images with cross-entropy plus, at
several layers, the attention-transfer loss that pulls its attention maps towards the teacher's.
An attention map of a [N, C, H, W] activation is `sum_c |a_c|^p`, divided by its L2 norm over
the pixels (Zagoruyko & Komodakis 2017); the loss is the mean squared difference of the two
maps, times that layer's beta.

Layers, for any architecture (BackdoorBench lists them per architecture: PreAct-ResNet's last
three residual stages): one forward pass on two bonafide images finds, for each spatial size a
4-D activation takes, the last module to finish at that size (a module called more than once, a
shared ReLU, is skipped); the outputs of the last three sizes with more than one pixel are the
attention layers, lowest level first. On PreAct-ResNet-18 that is the end of the 16x16 stage,
the end of the 8x8 stage and the head's batch norm on the 4x4 stage (BackdoorBench: the three
stages' outputs); on `small_cnn` the ReLUs closing its 8x8 and 4x4 blocks and the final
pooling. `layers` names them instead.

Defaults follow BackdoorBench (`config/defense/nad/cifar10.yaml`, `defense/nad.py`): teacher
and student each trained `te_epochs` = 10 epochs, SGD lr 0.01 (constant: BackdoorBench's
schedule keeps 0.01 for the first 20 epochs), momentum 0.9, weight decay 5e-4, batch 256,
betas 500, 1000, 1000 from low to high layer, p = 2, training augmentation on (BackdoorBench
loads the defender's images with the training transform; here only where the model's recipe
augments). BackdoorBench's defender holds 2,500 images (5% of CIFAR-10), so an epoch here is
2,500 samples (`samples_per_epoch`, the bonafide images repeated): the budget does not shrink
with the bonafide size.

Returns a `bench.Defended`: the student, and the series `nad_epochs` (per student epoch the mean
cross-entropy and attention losses) and `nad_layers` (the attention layers and their betas).
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import bench
from bench import BenchError
from bench.toolkit import epoch_order, random_crop_flip, to_model_input


class NAD(bench.Defense):
    name = "nad"
    description = "Neural Attention Distillation: fine-tune a teacher, distil its attention into the attacked model"
    paper = "https://arxiv.org/abs/2101.05930"
    code = "https://github.com/bboylyg/NAD"

    @dataclass(frozen=True)
    class Options:
        teacher_epochs: int = bench.option(10, "epochs fine-tuning the teacher (reference te_epochs: 10)", min=1)
        epochs: int = bench.option(10, "epochs training the student (reference: te_epochs, 10)", min=1)
        samples_per_epoch: int = bench.option(
            2500,
            "samples per epoch, the bonafide images repeated (reference: its 2,500 defender images); "
            "0: one pass over the bonafide set",
            min=0,
        )
        lr: float = bench.option(0.01, "SGD learning rate, constant (reference: 0.01)", min=0, min_exclusive=True)
        momentum: float = bench.option(0.9, "SGD momentum (reference: 0.9)", min=0, max=1)
        weight_decay: float = bench.option(5e-4, "L2 weight decay (reference: 5e-4)", min=0)
        batch_size: int = bench.option(256, "images per step (reference: 256)", min=1)
        betas: list[float] = bench.option(
            [500.0, 1000.0, 1000.0], "attention loss weight per layer, lowest first (reference: 500, 1000, 1000)"
        )
        p: float = bench.option(2.0, "power of the attention map (reference: 2)", min=0, min_exclusive=True)
        layers: list[str] = bench.option(
            [], "attention layers by module name, lowest first; empty: the last stage outputs (see the docs)"
        )
        augment: bool = bench.option(
            True, "use the model's training augmentation where its recipe augments (reference: on)"
        )

    def check_model(self, model, sample):
        layers = self.options.layers or stage_outputs(model, sample, len(self.options.betas))
        if len(layers) != len(self.options.betas):
            raise BenchError(f"nad: {len(layers)} attention layers but {len(self.options.betas)} betas")
        missing = [name for name in layers if name not in dict(model.named_modules())]
        if missing:
            raise BenchError(f"nad: the model has no module '{missing[0]}'; see bench.toolkit.layer_names(model)")

    def apply(self, model, bonafide, ctx):
        o = self.options
        layers = o.layers or stage_outputs(model, to_model_input(bonafide.x[:2]), len(o.betas))
        self.check_model(model, to_model_input(bonafide.x[:2]))
        teacher = copy.deepcopy(model)
        distil(teacher, None, bonafide, ctx, o, layers, stream="nad_teacher", epochs=o.teacher_epochs)
        teacher.eval().requires_grad_(False)
        history = distil(model, teacher, bonafide, ctx, o, layers, stream="nad_student", epochs=o.epochs)
        records = [{"layer": name, "beta": beta} for name, beta in zip(layers, o.betas)]
        return bench.Defended(model.eval(), series={"nad_epochs": history, "nad_layers": records})


def attention_map(activation: torch.Tensor, p: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """sum over channels of |a|^p, divided by its L2 norm over the pixels: [N, 1, H, W]."""
    energy = activation.float().abs().pow(p).sum(dim=1, keepdim=True)
    return energy / (torch.linalg.vector_norm(energy, dim=(2, 3), keepdim=True) + eps)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Mean squared difference of the two attention maps."""
    return F.mse_loss(attention_map(student, p), attention_map(teacher, p))


@torch.no_grad()
def stage_outputs(model: nn.Module, sample: torch.Tensor, count: int) -> list[str]:
    """For each spatial size a 4-D activation takes (in order), the last module to finish at
    it (modules called more than once skipped); the last `count` sizes with more than one pixel."""
    finished: list[tuple[str, tuple[int, int]]] = []
    calls: Counter[str] = Counter()

    def recorder(name):
        def record(module, inputs, output):
            calls[name] += 1
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                finished.append((name, tuple(output.shape[2:])))

        return record

    handles = [m.register_forward_hook(recorder(n)) for n, m in model.named_modules() if n]
    was_training = model.training
    try:
        model.eval()(sample)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    last_at: dict[tuple[int, int], str] = {}
    for name, size in finished:
        if calls[name] == 1:
            last_at.pop(size, None)  # re-inserted: dicts keep the order of the last insertion
            last_at[size] = name
    stages = [name for size, name in last_at.items() if size[0] * size[1] > 1]
    if len(stages) < count:
        raise BenchError(
            f"nad: the model has {len(stages)} spatial stages, fewer than the {count} attention layers asked "
            "for; name them with `layers` (and give as many betas)"
        )
    return stages[-count:]


def distil(model, teacher, bonafide, ctx, o, layers: list[str], *, stream: str, epochs: int) -> list[dict]:
    """Train `model` on the bonafide images: cross-entropy, plus the attention losses towards
    `teacher` at `layers` when a teacher is given. Returns per epoch the mean losses."""
    generator = ctx.generator(stream)
    optimizer = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    modules = [model.get_submodule(name) for name in layers]
    teacher_modules = [] if teacher is None else [teacher.get_submodule(name) for name in layers]
    augment = o.augment and ctx.recipe.augment
    history = []
    model.train()
    for epoch in ctx.progress(range(epochs), desc=stream.replace("_", " ")):
        order = epoch_order(len(bonafide), o.samples_per_epoch, generator, ctx.device)
        sums = torch.zeros(2, device=ctx.device)
        for start in range(0, len(order), o.batch_size):
            index = order[start : start + o.batch_size]
            x = bonafide.x[index]
            if augment:
                x = random_crop_flip(x, ctx.recipe.crop_padding, ctx.horizontal_flip, generator)
            inputs, labels = to_model_input(x), bonafide.y[index]
            with ctx.autocast(), _captured(modules) as student_maps:
                logits = model(inputs)
            cross_entropy = F.cross_entropy(logits.float(), labels)
            transfer = torch.zeros((), device=ctx.device)
            if teacher is not None:
                with torch.no_grad(), ctx.autocast(), _captured(teacher_modules) as teacher_maps:
                    teacher(inputs)
                for beta, s, t in zip(o.betas, student_maps, teacher_maps):
                    transfer = transfer + beta * attention_loss(s, t, o.p)
            optimizer.zero_grad(set_to_none=True)
            (cross_entropy + transfer).backward()
            optimizer.step()
            sums += torch.stack([cross_entropy.detach(), transfer.detach()]) * len(index)
        mean = (sums / len(order)).tolist()
        history.append({"epoch": epoch + 1, "cross_entropy": mean[0], "attention_loss": mean[1]})
    model.eval()
    return history


class _captured:
    """Within the block, the outputs of `modules` (in order) land in the yielded list."""

    def __init__(self, modules: list[nn.Module]):
        self.modules = modules
        self.outputs: list[torch.Tensor] = []

    def __enter__(self) -> list[torch.Tensor]:
        self.handles = [m.register_forward_hook(lambda m, i, out: self.outputs.append(out)) for m in self.modules]
        return self.outputs

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


@bench.hookimpl
def register_defenses(register):
    register(NAD)
