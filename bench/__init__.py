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
`bench.hookspecs`; test helpers for plugin authors are in `bench_plugins.testing`.
"""

import importlib.metadata

import pluggy

from bench.hookspecs import PROJECT

try:  # one source for the version: the installed package's metadata (pyproject.toml)
    __version__ = importlib.metadata.version("robustness-bench")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
hookimpl = pluggy.HookimplMarker(PROJECT)

# The public names load on first use (PEP 562), so that `bench --help` and other commands that
# need no model answer without importing torch.
_PUBLIC = {
    "Analysis": "bench.analyses",
    "AnalysisData": "bench.analyses",
    "AnalysisResult": "bench.analyses",
    "Figure": "bench.analyses",
    "Finding": "bench.analyses",
    "ModelRecipe": "bench.analyses",
    "SUITE_ATTACKS": "bench.jobs",
    "Attack": "bench.attacks",
    "Metric": "bench.metrics",
    "MetricKind": "bench.metrics",
    "Stage": "bench.attacks",
    "DefenseContext": "bench.context",
    "RunContext": "bench.context",
    "Dataset": "bench.data",
    "DatasetSplits": "bench.data",
    "ImageData": "bench.data",
    "Defended": "bench.defenses",
    "DefenderData": "bench.defenses",
    "Defense": "bench.defenses",
    "BenchError": "bench.errors",
    "DataNotFoundError": "bench.errors",
    "OptionError": "bench.errors",
    "SuiteError": "bench.errors",
    "UnknownPluginError": "bench.errors",
    "InputShape": "bench.models",
    "Model": "bench.models",
    "TrainRecipe": "bench.models",
    "option": "bench.options",
}


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'bench' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))


__all__ = [
    "Analysis",
    "AnalysisData",
    "AnalysisResult",
    "Attack",
    "BenchError",
    "DataNotFoundError",
    "Dataset",
    "DatasetSplits",
    "Defended",
    "DefenderData",
    "Defense",
    "DefenseContext",
    "Figure",
    "Finding",
    "ImageData",
    "InputShape",
    "Metric",
    "MetricKind",
    "Model",
    "ModelRecipe",
    "SUITE_ATTACKS",
    "OptionError",
    "RunContext",
    "Stage",
    "SuiteError",
    "TrainRecipe",
    "UnknownPluginError",
    "hookimpl",
    "option",
]
