"""The public plugin API: `bench` and `bench.toolkit`, and the built-ins use nothing else."""

import ast
import os
import re
from pathlib import Path

import pytest

import bench
import bench.toolkit

ROOT = Path(__file__).parent.parent.parent
PUBLIC = {"bench", "bench.toolkit"}


def bench_imports(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "bench":
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules |= {a.name for a in node.names if a.name.split(".")[0] == "bench"}
    return modules


# bench_plugins.testing is no plugin: its helpers drive the runner and the store as the CLI does.
PLUGIN_MODULES = [p for p in sorted((ROOT / "plugins").rglob("*.py")) if p != ROOT / "plugins" / "testing.py"]


@pytest.mark.parametrize(
    "path",
    PLUGIN_MODULES
    + [
        ROOT / "examples" / "bench-median-filter" / "bench_median_filter.py",
        ROOT / "examples" / "bench-example-attacks" / "bench_example_attacks.py",
    ],
    ids=lambda p: p.name,
)
def test_plugins_import_only_the_public_api(path):
    assert bench_imports(path) <= PUBLIC, f"{path.name} reaches into {bench_imports(path) - PUBLIC}"


def test_the_toolkit_exports_what_it_lists_and_versions_it():
    assert set(bench.toolkit.__all__) == {n for n in dir(bench.toolkit) if not n.startswith("_")} - {
        "BenchError"
    }  # re-exported from bench, used by require_api
    for name in bench.toolkit.__all__:
        assert getattr(bench.toolkit, name) is not None
    bench.toolkit.require_api(bench.toolkit.API_VERSION)
    with pytest.raises(bench.BenchError, match="needs bench.toolkit API version 99"):
        bench.toolkit.require_api(99)
    bench.toolkit.require_api(bench.toolkit.API_VERSION, bench.toolkit.API_VERSION + 2)  # a compatible range
    newer = bench.toolkit.API_VERSION + 1
    with pytest.raises(bench.BenchError, match=f"a version from {newer} to {newer + 3}"):
        bench.toolkit.require_api(newer, newer + 3)


@pytest.mark.parametrize(
    "module, never",
    [
        ("jobs", {"bench.stages", "bench.artifacts", "bench.store", "bench.registry", "bench.suite", "bench.runner"}),
        ("expansion", {"bench.stages", "bench.artifacts", "bench.store", "bench.runner", "bench.suite"}),
        ("artifacts", {"bench.stages", "bench.store", "bench.registry", "bench.suite", "bench.runner"}),
        ("artifact_cache", {"bench.stages", "bench.artifacts", "bench.store", "bench.registry", "bench.runner"}),
        ("keys", {"bench.stages", "bench.artifacts", "bench.store", "bench.registry", "bench.runner"}),
        ("bonafide", {"bench.stages", "bench.artifacts", "bench.store", "bench.registry", "bench.runner"}),
        ("stages", {"bench.store", "bench.registry", "bench.suite", "bench.runner"}),
        ("preflight", {"bench.stages", "bench.store", "bench.runner"}),
        ("store", {"bench.stages", "bench.artifacts", "bench.registry", "bench.runner"}),
    ],
)
def test_the_data_flows_one_way(module, never):
    """suite -> expansion -> jobs -> preflight/stages (with artifacts) -> store -> report: a
    module never imports one downstream of it, so a job runs without the store or the registry."""
    assert not bench_imports(ROOT / "bench" / f"{module}.py") & never


def test_a_test_without_the_third_party_mark_loads_only_this_projects_plugins():
    from conftest import BUILTIN_ENTRY_POINTS

    assert os.environ["BENCH_LOAD_PLUGINS"] == BUILTIN_ENTRY_POINTS
    assert {"digits", "sap", "robust_path"} <= set(BUILTIN_ENTRY_POINTS.split(","))


def test_a_plugin_can_build_another_by_name_and_list_a_models_layers():
    from bench_plugins.testing import trained_digits_model

    attack = bench.toolkit.build_plugin("attack", "pgd", eps=0.05, steps=2)
    assert attack.name == "pgd" and attack.options.eps == 0.05 and attack.options.steps == 2
    with pytest.raises(bench.BenchError, match="did you mean 'steps'"):
        bench.toolkit.build_plugin("attack", "pgd", stpes=2)
    model, _, _ = trained_digits_model(epochs=1, width=4)
    names = dict(bench.toolkit.layer_names(model))
    assert names["net"] == "Sequential" and any(kind == "Conv2d" for kind in names.values())
    assert all(model.get_submodule(name) is not None for name in names)


def builtin_names_and_metric_keys() -> set[str]:
    """Every built-in plugin's name and every metric key a built-in declares, but two words that
    are the core's own: `none`, the no-defense reference row (the report puts it first), and
    `stochastic`, the attribute by which a model declares randomness (an evasion metric echoes it)."""
    from bench.registry import load_plugins

    registry = load_plugins()
    words = set()
    for kind in ("dataset", "model", "attack", "defense", "analysis"):
        for name in registry.names(kind):
            cls = registry.get(kind, name).cls
            words |= {name} | {metric.key for metric in getattr(cls, "metrics", ())}
    return words - {"none", "stochastic"}


def test_no_core_module_names_a_builtin_plugin_or_its_metrics():
    """The core describes plugins only through what they declare (names, options, metrics):
    not in code, not in docstrings, not in examples."""
    words = builtin_names_and_metric_keys()
    assert {"badnets", "mcr", "digits", "asr", "robust_acc", "mcr_t"} <= words  # the lookup works
    pattern = re.compile(r"[\"'`](%s)[\"'`]" % "|".join(map(re.escape, sorted(words))))
    found = [
        f"{path.relative_to(ROOT)}:{text[: m.start()].count(chr(10)) + 1}: {m.group(0)}"
        for path in sorted((ROOT / "bench").rglob("*.py"))
        for text in [path.read_text()]
        for m in pattern.finditer(text)
    ]
    assert not found, "\n".join(found)


def test_no_core_function_is_longer_than_60_lines():
    """A newcomer can hold any function of the core in their head: split a longer one by stage."""
    long = [
        f"{path.relative_to(ROOT)}: {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in sorted((ROOT / "bench").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60
    ]
    assert not long, "\n".join(long)
