"""robustness-bench: a plugin-style benchmark for the adversarial robustness of image classifiers.

Writing a plugin, in short. A plugin is a plain class with a `name`, a one-line `description`
and, if it takes any, an `Options` frozen dataclass of typed, documented fields; a module
registers it through a hook:

    from dataclasses import dataclass
    import bench

    class MedianFilter(bench.Defense):
        name = "median_filter"
        description = "Median-filter inputs before the model"

        @dataclass(frozen=True)
        class Options:
            kernel: int = bench.option(3, "filter size in pixels", min=1)

        def apply(self, model, bonafide, ctx):
            return MedianFiltered(model, self.options.kernel)

    @bench.hookimpl
    def register_defenses(register):
        register(MedianFilter)

and the package declares the module in its pyproject.toml:

    [project.entry-points.robustness_bench]
    median_filter = "my_package.median_filter"

After `pip install`, `bench plugins` lists it and suites can name it. The hooks are in
`bench.hookspecs`; test helpers for plugin authors are in `bench.testing`.
"""

import pluggy

from bench.hookspecs import PROJECT

__version__ = "0.1.0"
hookimpl = pluggy.HookimplMarker(PROJECT)

from bench.analyses import Analysis, AnalysisData, AnalysisResult, Figure, ModelRecipe  # noqa: E402
from bench.attacks import Attack, Metric, MetricKind, Stage  # noqa: E402
from bench.context import DefenseContext, RunContext  # noqa: E402
from bench.data import Dataset, DatasetSplits, ImageData  # noqa: E402
from bench.defenses import Defended, Defense  # noqa: E402
from bench.errors import BenchError, DataNotFoundError, OptionError, SuiteError, UnknownPluginError  # noqa: E402
from bench.models import InputShape, Model, TrainRecipe  # noqa: E402
from bench.options import option  # noqa: E402

__all__ = ["Analysis", "AnalysisData", "AnalysisResult", "Attack", "BenchError", "DataNotFoundError", "Dataset", "DatasetSplits", "Defended", "Defense",
           "DefenseContext", "Figure", "ImageData", "InputShape", "Metric", "MetricKind", "Model", "ModelRecipe",
           "OptionError", "RunContext",
           "Stage", "SuiteError", "TrainRecipe", "UnknownPluginError", "hookimpl", "option"]
