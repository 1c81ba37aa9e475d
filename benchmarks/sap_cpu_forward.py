"""The cost of SAP's exact sampling on the CPU (issue 11): one forward pass of the `small_cnn`
plugin undefended, with `sap` as shipped (`torch.multinomial` with replacement), and with the
same draws made by inverse-CDF sampling (`searchsorted` on each example's cumulative
probabilities, all examples of a layer at once; the same law). Interleaved, best of `--repeats`
per variant, one torch thread by default, on 8x8 (digits) and 32x32 (CIFAR-10) inputs. Prints
a markdown table. Not part of the test suite.

    python benchmarks/sap_cpu_forward.py [--batch 500] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

import bench
from bench.models import Classifier
from bench_plugins.defenses import sap
from bench_plugins.models.small_cnn import SmallCNN


def inverse_cdf_prune(h: torch.Tensor, frac: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """`sap.prune_activations` with the draws made by inverse-CDF sampling."""
    flat = h.flatten(1).float()
    units = flat.shape[1]
    draws = max(1, round(frac * units))
    magnitude = flat.abs()
    total = magnitude.sum(dim=1, keepdim=True)
    probabilities = torch.where(total > 0, magnitude / total.clamp_min(1e-30), torch.full_like(flat, 1 / units))
    cdf = probabilities.cumsum(dim=1)
    uniform = torch.rand(flat.shape[0], draws, generator=generator, device=h.device) * cdf[:, -1:]
    drawn = torch.searchsorted(cdf, uniform).clamp_(max=units - 1)
    kept = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, drawn, True)
    keep_probability = -torch.expm1(draws * torch.log1p(-probabilities.clamp(max=1 - 1e-7)))
    keep_probability = torch.where(probabilities >= 1 - 1e-7, torch.ones_like(flat), keep_probability)
    return torch.where(kept, flat / keep_probability.clamp_min(1e-30), torch.zeros_like(flat)).view_as(h)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, best of {args.repeats}\n")
    print(
        "| input | undefended (ms) | sap, multinomial (ms) | sap, inverse CDF (ms) | ratio multinomial "
        "| ratio inverse CDF |"
    )
    print("|---|---|---|---|---|---|")
    for side, channels in ((8, 1), (32, 3)):
        torch.manual_seed(0)
        model = Classifier(
            SmallCNN().build(bench.InputShape(channels, side, side, 10)), (0.5,) * channels, (0.25,) * channels
        ).eval()
        pruned, _ = sap.insert_pruning(model, 1.0, None)
        x = torch.rand(args.batch, channels, side, side)
        best = {"plain": float("inf"), "multinomial": float("inf"), "inverse": float("inf")}
        original = sap.prune_activations
        with torch.no_grad():
            for _ in range(args.repeats):
                for variant in best:
                    sap.prune_activations = inverse_cdf_prune if variant == "inverse" else original
                    start = time.perf_counter()
                    (model if variant == "plain" else pruned)(x)
                    best[variant] = min(best[variant], time.perf_counter() - start)
        sap.prune_activations = original
        plain, multinomial, inverse = (best[k] * 1000 for k in ("plain", "multinomial", "inverse"))
        print(
            f"| {channels}x{side}x{side} | {plain:.1f} | {multinomial:.1f} | {inverse:.1f} | "
            f"{multinomial / plain:.1f}x | {inverse / plain:.1f}x |"
        )


if __name__ == "__main__":
    main()
