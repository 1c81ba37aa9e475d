"""A complete third-party defense for robustness-bench: median smoothing of the inputs
(feature squeezing, Xu et al. 2018). Installed with pip, it is discovered through the
`robustness_bench` entry-point group like the built-ins."""

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

import bench


class MedianFiltered(nn.Module):
    """Applies a k x k median filter to every image before the model."""

    def __init__(self, model: nn.Module, kernel: int):
        super().__init__()
        self.model, self.kernel = model, kernel

    def forward(self, x):
        pad = self.kernel // 2
        patches = F.pad(x, (pad, pad, pad, pad), mode="reflect").unfold(2, self.kernel, 1).unfold(3, self.kernel, 1)
        return self.model(patches.flatten(-2).median(dim=-1).values)


class MedianFilter(bench.Defense):
    name = "median_filter"
    description = "Median-filter the inputs before the model (feature squeezing)"
    defender_data = bench.DefenderData.NONE  # what it may use: here, the model alone

    @dataclass(frozen=True)
    class Options:
        kernel: int = bench.option(3, "side of the (odd) filter window, in pixels", min=1)

        def __post_init__(self):  # checked when the suite is read, before anything runs
            if self.kernel % 2 == 0:
                raise ValueError(f"kernel must be odd, got {self.kernel}")

    def apply(self, model, bonafide, ctx):
        return MedianFiltered(model, self.options.kernel)


@bench.hookimpl
def register_defenses(register):
    register(MedianFilter)
