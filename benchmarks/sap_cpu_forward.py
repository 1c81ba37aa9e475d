"""The cost of SAP's exact sampling on the CPU (issue 11): one pass of the `small_cnn` plugin
undefended, with `sap` as shipped (guide-table inverse-CDF draws, `sap.draw_units`), and with
the same draws made by `torch.multinomial` with replacement (the same law; the sampler SAP
shipped before). Forward only (evaluation) and forward + backward to the input (one step of
an attack); interleaved, best of `--repeats` per variant, one torch thread by default, on 8x8
(digits) and 32x32 (CIFAR-10) inputs. Prints a markdown table. Not part of the test suite.
`--device cuda` times the same code on a GPU (synchronised before each clock read).

    python benchmarks/sap_cpu_forward.py [--batch 256] [--repeats 5] [--threads 1] [--width 32] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch

import bench
from bench.models import Classifier
from bench_plugins.defenses import sap
from bench_plugins.models.small_cnn import SmallCNN


def multinomial_units(weights: torch.Tensor, draws: int, generator: torch.Generator | None) -> torch.Tensor:
    """`sap.draw_units` with `torch.multinomial` making the draws."""
    total = weights.sum(dim=1, keepdim=True)
    p = torch.where(total > 0, weights / total.clamp_min(1e-30), torch.ones_like(weights))
    drawn = torch.multinomial(p, draws, replacement=True, generator=generator)
    return torch.zeros_like(weights, dtype=torch.bool).scatter_(1, drawn, True)


def timed(model: torch.nn.Module, x: torch.Tensor, backward: bool) -> float:
    synchronize = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    synchronize()
    start = time.perf_counter()
    if backward:
        model(x.clone().requires_grad_()).sum().backward()
    else:
        with torch.no_grad():
            model(x)
    synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--width", type=int, default=32, help="small_cnn width (its default: 32)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {device}, {args.threads} thread(s), batch {args.batch}, "
        f"small_cnn width {args.width}, best of {args.repeats}\n"
    )
    print("| input | pass | undefended (ms) | sap (ms) | sap, multinomial draws (ms) | ratio sap | ratio multinomial |")
    print("|---|---|---|---|---|---|---|")
    shipped = sap.draw_units
    for side, channels in ((8, 1), (32, 3)):
        torch.manual_seed(0)
        network = SmallCNN(SmallCNN.Options(width=args.width)).build(bench.InputShape(channels, side, side, 10))
        model = Classifier(network, (0.5,) * channels, (0.25,) * channels).to(device).eval()
        pruned, _ = sap.insert_pruning(model, 1.0, None)
        x = torch.rand(args.batch, channels, side, side, device=device)
        for backward in (False, True):
            best = {"plain": float("inf"), "sap": float("inf"), "multinomial": float("inf")}
            for _ in range(args.repeats):
                for variant in best:
                    sap.draw_units = multinomial_units if variant == "multinomial" else shipped
                    best[variant] = min(best[variant], timed(model if variant == "plain" else pruned, x, backward))
            sap.draw_units = shipped
            plain, fast, multinomial = (best[k] * 1000 for k in ("plain", "sap", "multinomial"))
            print(
                f"| {channels}x{side}x{side} | {'forward + backward' if backward else 'forward'} | {plain:.1f} | "
                f"{fast:.1f} | {multinomial:.1f} | {fast / plain:.1f}x | {multinomial / plain:.1f}x |"
            )


if __name__ == "__main__":
    main()
