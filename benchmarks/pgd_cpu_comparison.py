"""Compare native PGD (bench.adversarial.pgd_attack) with ART's ProjectedGradientDescentPyTorch and
torchattacks' PGD on the CPU, in one run: the same briefly trained ResNet-20, the same CIFAR-10
test images, the same batch size and attack settings. Prints a markdown table of images/s, speed
ratios and robust accuracies (issue 8). Not part of the test suite.

    python benchmarks/pgd_cpu_comparison.py --cifar10-root R --save-weights resnet20.pt --train-only
    python benchmarks/pgd_cpu_comparison.py --cifar10-root R --weights resnet20.pt

(or both in one command, without --train-only and --weights). The model is the `resnet20` plugin
behind `bench.models.Classifier` (CIFAR-10 mean/std), trained for a few epochs on a seeded subset
of the training images with `bench.training.train_classifier`; by default the training is FGSM
adversarial training with a random start (Wong, Rice & Kolter 2020), so that PGD robust accuracy
is neither 0 nor 100%. `--weights` loads a state dict instead and `--save-weights` keeps the
trained one.

Each library draws its random start from its own generator (native: a seeded torch.Generator;
torchattacks: torch's global generator; ART: numpy's global generator), so with a random start
the robust accuracies differ by the luck of the draw. Without a random start the three compute
the same iterates (sign of the cross-entropy gradient, step, clip to the eps-ball and to [0, 1])
and should agree to a few images; both are reported.

Timings are of the attack only (robust accuracy is then counted by one shared function), after a
one-batch warm-up, over `--repeats` runs with random start and one without (the random start
costs one uniform draw per pixel, nothing next to ten gradient steps). The CPU is usually shared,
so the runs go batch by batch with the three libraries interleaved (in a rotating order), and a
library's time is the sum over batches of its best time for that batch: load from other
processes then falls on all three alike and a burst of it spoils one sample, not a whole run.
ART's timing includes the forward pass its `generate` always makes to log the success rate, and
its estimator's backward pass, which also computes weight gradients: both are part of what a
user of ART pays.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from importlib.metadata import version
from typing import Callable

import numpy as np
import torch
from torch import nn

from bench import InputShape, RunContext, TrainRecipe
from bench.adversarial import Norm, eval_mode, pgd_attack
from bench.evaluation import to_model_input
from bench.models import Classifier
from bench.training import train_classifier
from bench_plugins.datasets.cifar10 import Cifar10
from bench_plugins.models.resnet20 import ResNet20

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# (x, y, random_start, seed) -> x_adv for one batch; the seed drives that batch's random start
AttackFn = Callable[[torch.Tensor, torch.Tensor, bool, int], torch.Tensor]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--cifar10-root",
        default="",
        help="the cifar10 plugin's root (tarball, ImageFolder or "
        "torchvision files); default: $BENCH_CIFAR10_ROOT, else ./data",
    )
    parser.add_argument("--images", type=int, default=200, help="test images attacked (seeded subset)")
    parser.add_argument(
        "--batch-size", type=int, default=50, help="attack batch size, the same for all three (ART's batch_size)"
    )
    parser.add_argument("--eps", type=float, default=8 / 255, help="L-inf budget")
    parser.add_argument("--step", type=float, default=2 / 255, help="step size")
    parser.add_argument("--steps", type=int, default=10, help="PGD iterations")
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="timed runs per library with random start, then one without; per batch the best run counts",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--weights", default="", help="state dict of Classifier(resnet20) to load instead of training")
    parser.add_argument("--save-weights", default="", help="save the trained state dict here")
    parser.add_argument("--train-only", action="store_true", help="stop after training (with --save-weights)")
    parser.add_argument("--train-images", type=int, default=4000, help="training images (seeded subset)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs")
    parser.add_argument(
        "--standard-training",
        action="store_true",
        help="train on clean images only (robust accuracy then lands near 0)",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_model(args, train, ctx: RunContext) -> tuple[nn.Module, str]:
    torch.manual_seed(args.seed)
    model = Classifier(ResNet20().build(InputShape(3, 32, 32, 10)), CIFAR10_MEAN, CIFAR10_STD)
    if args.weights:
        state = torch.load(args.weights, map_location="cpu")
        model.load_state_dict(state.get("state_dict", state))
        return model.eval(), f"weights from {args.weights}"
    recipe = TrainRecipe(
        epochs=args.epochs,
        batch_size=128,
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        warmup_fraction=0.15,
        augment=True,
        crop_padding=4,
    )

    def fgsm(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        # FGSM with a random start and step 1.25 eps ("fast adversarial training").
        return pgd_attack(
            model, x, y, eps=args.eps, step=1.25 * args.eps, steps=1, random_start=True, generator=generator
        )

    start = time.perf_counter()
    losses = train_classifier(model, train, recipe, ctx, flip=True, perturb=None if args.standard_training else fgsm)
    kind = "standard" if args.standard_training else "FGSM adversarial (random start, step 1.25 eps)"
    description = (
        f"{kind} training, {args.epochs} epochs on {len(train)} images, batch 128, "
        f"{time.perf_counter() - start:.0f} s, final loss {losses[-1]:.3f}"
    )
    if args.save_weights:
        torch.save(model.state_dict(), args.save_weights)
    return model.eval(), description


def make_attacks(model: nn.Module, args) -> dict[str, AttackFn]:
    import torchattacks
    from art.attacks.evasion import ProjectedGradientDescentPyTorch
    from art.estimators.classification import PyTorchClassifier

    def native(x, y, random_start, seed):
        with eval_mode(model):
            return pgd_attack(
                model,
                x,
                y,
                eps=args.eps,
                step=args.step,
                steps=args.steps,
                norm=Norm.LINF,
                random_start=random_start,
                generator=torch.Generator().manual_seed(seed),
            )

    torchattacks_pgd = {
        rs: torchattacks.PGD(model, eps=args.eps, alpha=args.step, steps=args.steps, random_start=rs)
        for rs in (True, False)
    }

    def with_torchattacks(x, y, random_start, seed):
        torch.manual_seed(seed)  # torchattacks draws its random start from torch's global generator
        return torchattacks_pgd[random_start](x, y)

    classifier = PyTorchClassifier(
        model=model,
        loss=nn.CrossEntropyLoss(),
        input_shape=(3, 32, 32),
        nb_classes=10,
        clip_values=(0.0, 1.0),
        device_type="cpu",
    )
    art_pgd = {
        rs: ProjectedGradientDescentPyTorch(
            classifier,
            norm=np.inf,
            eps=args.eps,
            eps_step=args.step,
            max_iter=args.steps,
            num_random_init=int(rs),
            batch_size=args.batch_size,
            verbose=False,
        )
        for rs in (True, False)
    }

    def with_art(x, y, random_start, seed):
        np.random.seed(seed)  # ART draws its random start from numpy's global generator
        return torch.from_numpy(art_pgd[random_start].generate(x.numpy(), y=y.numpy()))

    return {"native": native, "torchattacks": with_torchattacks, "ART": with_art}


def correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Per image: whether the model classifies it correctly (one shared count for all three)."""
    with torch.no_grad(), eval_mode(model):
        return torch.cat(
            [model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size] for i in range(0, len(x), batch_size)]
        )


def main() -> None:
    args = parse_args()
    if args.train_only and not args.save_weights:
        raise SystemExit("pgd_cpu_comparison: --train-only needs --save-weights")
    torch.set_num_threads(args.threads)
    ctx = RunContext(device=torch.device("cpu"), seed=args.seed, num_classes=10, show_progress=False)
    splits = Cifar10(
        Cifar10.Options(root=args.cifar10_root, train_images=args.train_images, test_images=args.images)
    ).load()
    model, model_description = build_model(args, splits.train, ctx)
    x, y = to_model_input(splits.test.x), splits.test.y
    clean = correct(model, x, y, args.batch_size).float().mean().item()
    print(
        f"CPU: {cpu_model()}, {torch.get_num_threads()} threads; torch {torch.__version__}, "
        f"adversarial-robustness-toolbox {version('adversarial-robustness-toolbox')}, "
        f"torchattacks {version('torchattacks')}, numpy {np.__version__}"
    )
    print(
        f"Model: resnet20 plugin in Classifier (CIFAR-10 mean/std), {model_description}; "
        f"clean accuracy {clean:.1%} on the {len(x)} test images attacked ({splits.source})"
    )
    if args.train_only:
        print(f"Saved the state dict to {args.save_weights}")
        return
    print(
        f"Attack: PGD-{args.steps}, L-inf eps {args.eps * 255:g}/255, step {args.step * 255:g}/255, "
        f"batch {args.batch_size} for all three, float32"
    )

    attacks = make_attacks(model, args)
    names = list(attacks)
    starts = range(0, len(x), args.batch_size)
    load_before = os.getloadavg()
    for attack in attacks.values():  # warm-up: one batch each
        attack(x[: args.batch_size], y[: args.batch_size], True, args.seed)
    # wall[name][run][batch] and cpu[...]: seconds. Batches are interleaved across the libraries
    # (in an order that rotates), so that load from other processes falls on all three alike.
    runs = [True] * args.repeats + [False]
    wall = {name: [[0.0] * len(starts) for _ in runs] for name in names}
    cpu = {name: [[0.0] * len(starts) for _ in runs] for name in names}
    adversarial = {(name, rs): torch.empty_like(x) for name in names for rs in (True, False)}
    for run, random_start in enumerate(runs):
        for batch, start in enumerate(starts):
            part = slice(start, start + args.batch_size)
            for k in range(len(names)):
                name = names[(batch + run + k) % len(names)]
                began, began_cpu = time.perf_counter(), time.process_time()
                x_adv = attacks[name](x[part], y[part], random_start, args.seed + batch)
                wall[name][run][batch] = time.perf_counter() - began
                cpu[name][run][batch] = time.process_time() - began_cpu
                adversarial[name, random_start][part] = x_adv  # the same for every repeat: seeded per batch
    load_after = os.getloadavg()
    correct_after = {key: correct(model, x_adv, y, args.batch_size) for key, x_adv in adversarial.items()}

    def best(seconds):  # per library: the sum over batches of the batch's best run
        return {name: sum(min(run[b] for run in seconds[name]) for b in range(len(starts))) for name in names}

    best_wall, best_cpu = best(wall), best(cpu)
    acc = {key: c.float().mean().item() for key, c in correct_after.items()}
    print()
    print(
        "| implementation | images/s | native speed / this | images per CPU-second | native / this, CPU "
        "| robust acc, random start | vs native | robust acc, no random start | vs native |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        ratios = [
            "1 (reference)" if name == "native" else f"{best_[name] / best_['native']:.2f}x"
            for best_ in (best_wall, best_cpu)
        ]
        cells = [
            f"{acc[name, rs]:.1%} | "
            + ("" if name == "native" else f"{(acc[name, rs] - acc['native', rs]) * 100:+.1f} pt")
            for rs in (True, False)
        ]
        print(
            f"| {name} | {len(x) / best_wall[name]:.2f} | {ratios[0]} | {len(x) / best_cpu[name]:.2f} "
            f"| {ratios[1]} | {cells[0]} | {cells[1]} |"
        )
    print()
    print(
        f"- images/s: wall clock, per batch the best of {len(runs)} runs ({args.repeats} with random start, "
        f"then 1 without), summed over the {len(starts)} batches; CPU-seconds: this process's CPU time "
        f"(all threads), counted the same way"
    )
    print(
        "- whole runs, wall seconds: "
        + "; ".join(f"{name} " + ", ".join(f"{sum(run):.1f}" for run in wall[name]) for name in names)
    )
    for name in names[1:]:
        flips = [(correct_after[name, rs] != correct_after["native", rs]).sum().item() for rs in (True, False)]
        gap = (adversarial[name, False] - adversarial["native", False]).abs()
        print(
            f"- {name} vs native: per-image verdict differs on {flips[0]} of {len(x)} images with random start, "
            f"{flips[1]} without; without random start {(gap > 1e-6).float().mean().item():.3%} of the "
            f"adversarial pixels differ (by at most {gap.max().item() * 255:.2f}/255)"
        )
    spread = {rs: max(abs(acc[name, rs] - acc["native", rs]) for name in names) * 100 for rs in (True, False)}
    verdict = "within" if max(spread.values()) <= 1 else "NOT within"
    print(
        f"- largest robust-accuracy difference from native: {spread[True]:.1f} points with random start, "
        f"{spread[False]:.1f} without ({verdict} 1 point; 1 point = {len(x) / 100:g} images)"
    )
    print(
        f"- load average (1, 5, 15 min) on {os.cpu_count()} CPUs: {load_before[0]:.2f}, {load_before[1]:.2f}, "
        f"{load_before[2]:.2f} before the attacks, {load_after[0]:.2f}, {load_after[1]:.2f}, "
        f"{load_after[2]:.2f} after"
    )


if __name__ == "__main__":
    main()
