"""Time native PGD (bench.adversarial.pgd_attack) against ART's ProjectedGradientDescentPyTorch
on the same PreAct-ResNet-18, GPU and CIFAR-10-shaped images; print images/s, robust accuracy
of both and the speed ratio. Not part of the test suite.

    python benchmarks/pgd_throughput.py                       # random weights and images
    python benchmarks/pgd_throughput.py --weights model.pt --cifar10-root data/   # trained model, real images

With random weights and images the robust accuracies are of the model's own predictions
(labels = clean predictions), which still checks that both implementations agree. `--weights`
takes a state dict of `bench.models.Classifier(PreActResNet)` (as the bench model cache stores
it, optionally under a "state_dict" key).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from bench.adversarial import Norm, eval_mode, pgd_attack, robust_accuracy
from bench.data import ImageData
from bench.models import Classifier, InputShape
from bench_plugins.models.preact_resnet18 import PreActResNet18

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000, help="images attacked")
    parser.add_argument(
        "--weights", default="", help="state dict of a trained Classifier(PreActResNet18); default: random weights"
    )
    parser.add_argument(
        "--cifar10-root",
        default="",
        help="use the first --images CIFAR-10 test images from "
        "here (the cifar10 plugin's root); default: random images labelled by the model",
    )
    parser.add_argument("--eps", type=float, default=8 / 255, help="L-inf budget")
    parser.add_argument("--step", type=float, default=2 / 255, help="step size")
    parser.add_argument("--steps", type=int, default=10, help="PGD iterations")
    parser.add_argument("--random-start", action="store_true", help="random start (ART: num_random_init=1)")
    parser.add_argument("--batch-size", type=int, default=500, help="native PGD batch size")
    parser.add_argument("--art-batch-size", type=int, default=32, help="ART batch size (32 is ART's default)")
    parser.add_argument(
        "--precision",
        choices=("bf16", "fp32"),
        default="bf16",
        help="native PGD forward precision (the loss is float32 either way; ART runs fp32)",
    )
    parser.add_argument("--skip-art", action="store_true", help="time native PGD only")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def build_model(weights: str, device: torch.device) -> nn.Module:
    net = PreActResNet18().build(InputShape(3, 32, 32, 10))
    model = Classifier(net, CIFAR10_MEAN, CIFAR10_STD)
    if weights:
        state = torch.load(weights, map_location="cpu")
        model.load_state_dict(state.get("state_dict", state))
    return model.to(device).to(memory_format=torch.channels_last).eval()


def load_images(args, model: nn.Module, device: torch.device) -> ImageData:
    if args.cifar10_root:
        from bench_plugins.datasets.cifar10 import Cifar10

        test = Cifar10(Cifar10.Options(root=args.cifar10_root)).load().test
        return ImageData(test.x[: args.images], test.y[: args.images]).to(device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    x = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, device=device, generator=gen)
    with torch.no_grad():
        y = torch.cat([model(x[i : i + 500].float() / 255).argmax(1) for i in range(0, len(x), 500)])
    return ImageData(x, y)


def time_native(model, data: ImageData, args, device) -> tuple[float, float]:
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if args.precision == "bf16"
        else (lambda: torch.autocast("cuda", enabled=False))
    )
    generator = torch.Generator(device=device).manual_seed(args.seed)

    def attack(x, y):
        return pgd_attack(
            model,
            x,
            y,
            eps=args.eps,
            step=args.step,
            steps=args.steps,
            norm=Norm.LINF,
            random_start=args.random_start,
            generator=generator,
            autocast=autocast,
        )

    def run(images: ImageData) -> torch.Tensor:
        with eval_mode(model):
            return robust_accuracy(
                model, images.x, images.y, attack=attack, batch_size=args.batch_size, autocast=autocast
            ).accuracy()

    run(ImageData(data.x[: args.batch_size], data.y[: args.batch_size]))  # warm-up: cuDNN autotuning
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    accuracy = run(data).item()
    return time.perf_counter() - start, accuracy


def time_art(model, data: ImageData, args, device) -> tuple[float, float]:
    from art.attacks.evasion import ProjectedGradientDescentPyTorch
    from art.estimators.classification import PyTorchClassifier

    classifier = PyTorchClassifier(
        model=model,
        loss=nn.CrossEntropyLoss(),
        input_shape=(3, 32, 32),
        nb_classes=10,
        clip_values=(0.0, 1.0),
        device_type="gpu",
    )
    attack = ProjectedGradientDescentPyTorch(
        classifier,
        norm=np.inf,
        eps=args.eps,
        eps_step=args.step,
        max_iter=args.steps,
        num_random_init=int(args.random_start),
        batch_size=args.art_batch_size,
        verbose=False,
    )
    x = data.x.float().div(255).cpu().numpy()
    y = data.y.cpu().numpy()
    attack.generate(x[: args.art_batch_size], y=y[: args.art_batch_size])  # warm-up
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    x_adv = attack.generate(x, y=y)
    predictions = classifier.predict(x_adv, batch_size=args.art_batch_size).argmax(axis=1)
    elapsed = time.perf_counter() - start
    return elapsed, float((predictions == y).mean())


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("pgd_throughput: needs a CUDA GPU")
    device = torch.device("cuda")
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = True
    model = build_model(args.weights, device)
    data = load_images(args, model, device)
    print(
        f"{torch.cuda.get_device_name(device)}; PreAct-ResNet-18 ({'trained' if args.weights else 'random'} "
        f"weights); {len(data)} {'CIFAR-10' if args.cifar10_root else 'random'} images; PGD-{args.steps} "
        f"L-inf eps {args.eps:.5f} step {args.step:.5f}, random start {args.random_start}"
    )
    native_s, native_acc = time_native(model, data, args, device)
    print(
        f"native ({args.precision}, batch {args.batch_size}): {native_s:.3f} s, "
        f"{len(data) / native_s:,.0f} images/s, robust accuracy {native_acc:.4f}"
    )
    if args.skip_art:
        return
    art_s, art_acc = time_art(model, data, args, device)
    print(
        f"ART (fp32, batch {args.art_batch_size}): {art_s:.3f} s, {len(data) / art_s:,.0f} images/s, "
        f"robust accuracy {art_acc:.4f}"
    )
    print(
        f"native is {art_s / native_s:.2f}x the speed of ART; robust accuracy differs by "
        f"{abs(native_acc - art_acc) * 100:.2f} points"
    )


if __name__ == "__main__":
    main()
