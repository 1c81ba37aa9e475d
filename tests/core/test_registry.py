"""Plugin discovery: the built-ins, a third-party package installed with pip, broken plugins."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bench.registry import ENTRY_POINT_GROUP, build_registry
from bench_plugins.testing import write_suite
import importlib.metadata

BUILT_INS = {
    "dataset": {"digits", "cifar10"},
    "model": {"small_cnn", "preact_resnet18"},
    "attack": {"badnets"},
    "defense": {"none", "finetune"},
}
# Every test here installs or fakes plugin packages of its own.
pytestmark = pytest.mark.third_party_plugins
EXAMPLE = Path(__file__).parent.parent.parent / "examples" / "bench-median-filter"


def test_built_ins_load_through_the_entry_point_group(registry):
    for kind, names in BUILT_INS.items():
        assert names <= set(registry.names(kind))
        for name in names:
            assert registry.get(kind, name).package == "robustness-bench"
    assert not [p for p in registry.problems if p.package == "robustness-bench"]


def fake_distribution(site: Path, package: str, modules: dict[str, str], entry_points: dict[str, str]) -> None:
    """A distribution as pip would leave it: modules plus a .dist-info with entry points."""
    for name, source in modules.items():
        (site / f"{name}.py").write_text(textwrap.dedent(source))
    info = site / f"{package.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{lines}\n")


@pytest.fixture
def broken_site(tmp_path, monkeypatch):
    fake_distribution(
        tmp_path,
        "broken-import",
        {"broken_import": "import not_a_module_anywhere\n"},
        {"broken_import": "broken_import"},
    )
    fake_distribution(
        tmp_path,
        "dupe-defense",
        {
            "dupe_defense": """
        import bench

        class Impostor(bench.Defense):
            name = "finetune"
            description = "claims a taken name"

        class Fine(bench.Defense):
            name = "dupe_ok"
            description = "a well-behaved defense from the same package"

        @bench.hookimpl
        def register_defenses(register):
            register(Impostor)
            register(Fine)
        """
        },
        {"dupe_defense": "dupe_defense"},
    )
    fake_distribution(
        tmp_path,
        "typo-hook",
        {
            "typo_hook": """
        import bench

        @bench.hookimpl
        def register_defence(register):
            pass
        """
        },
        {"typo_hook": "typo_hook"},
    )
    fake_distribution(
        tmp_path,
        "exits-on-import",
        {"exits_on_import": "import sys\nsys.exit(0)\n"},
        {"exits_on_import": "exits_on_import"},
    )
    fake_distribution(
        tmp_path,
        "exits-in-hook",
        {
            "exits_in_hook": """
        import sys
        import bench

        @bench.hookimpl
        def register_defenses(register):
            sys.exit(0)
        """
        },
        {"exits_in_hook": "exits_in_hook"},
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_broken_plugins_are_reported_by_name_and_the_others_load(broken_site):
    registry = build_registry(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    problems = {p.plugin: p for p in registry.problems}
    assert "No module named 'not_a_module_anywhere'" in problems["broken_import"].message
    assert problems["broken_import"].package == "broken-import"
    duplicate = problems["dupe_defense"].message
    assert "defense 'finetune' from dupe-defense" in duplicate and "from robustness-bench" in duplicate
    with pytest.raises(Exception, match="ambiguous"):  # a suite naming it is refused, not silently the built-in
        registry.get("defense", "finetune")
    assert registry.get("defense", "dupe_ok").package == "dupe-defense"
    assert "register_defence" in problems["typo_hook"].message
    # a plugin calling sys.exit() at import or in its hook is one problem, not the end of bench
    assert "failed to load: SystemExit" in problems["exits_on_import"].message
    assert "register_defenses failed: SystemExit" in problems["exits_in_hook"].message
    for kind, names in BUILT_INS.items():
        assert names <= set(registry.names(kind))


def test_load_plugins_switch_limits_what_loads(broken_site, monkeypatch):
    monkeypatch.setenv("BENCH_LOAD_PLUGINS", "digits,none")
    registry = build_registry(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    assert registry.names("dataset") == ["digits"] and registry.names("defense") == ["none"]
    assert registry.problems == []


def test_bench_plugins_lists_problems_without_failing(broken_site):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(broken_site), *sys.path])}
    result = subprocess.run(
        [sys.executable, "-m", "bench.cli", "plugins", "--reload"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "badnets" in result.stdout and "dupe_ok" in result.stdout
    assert "broken_import (broken-import): failed to load" in result.stderr


CATALOG_PROBE = (
    "import sys, json; from bench.catalog import catalog; found = catalog(); "
    "print(json.dumps({'torch': 'torch' in sys.modules, "
    "'descriptions': {p['name']: p['description'] for p in found['plugins']}}))"
)


def catalog_in_subprocess(site: Path, cache: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sys.path]), "BENCH_CACHE_DIR": str(cache)}
    result = subprocess.run([sys.executable, "-c", CATALOG_PROBE], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_bench_plugins_answers_from_its_catalog_until_a_plugin_changes(tmp_path):
    site, cache = tmp_path / "site", tmp_path / "cache"
    site.mkdir()
    source = """
        import bench

        class Blur(bench.Defense):
            name = "blur"
            description = "DESCRIPTION"

            def apply(self, model, bonafide, ctx):
                return model

        @bench.hookimpl
        def register_defenses(register):
            register(Blur)
        """
    fake_distribution(
        site, "bench-blur", {"bench_blur": source.replace("DESCRIPTION", "first")}, {"blur": "bench_blur"}
    )
    first = catalog_in_subprocess(site, cache)
    assert first["torch"] and first["descriptions"]["blur"] == "first"  # loaded: plugin modules import torch
    again = catalog_in_subprocess(site, cache)
    assert not again["torch"] and again["descriptions"] == first["descriptions"]  # from the cache, no torch
    (site / "bench_blur.py").write_text(textwrap.dedent(source.replace("DESCRIPTION", "second, edited")))
    assert catalog_in_subprocess(site, cache)["descriptions"]["blur"] == "second, edited"


def test_third_party_package_installed_with_pip_is_discovered_and_runs(tmp_path):
    site, source = tmp_path / "site", tmp_path / "source"
    shutil.copytree(EXAMPLE, source)  # pip builds in place: keep the repository clean
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(site),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sys.path])}
    listing = subprocess.run([sys.executable, "-m", "bench.cli", "plugins"], env=env, capture_output=True, text=True)
    assert listing.returncode == 0, listing.stderr
    line = next(row for row in listing.stdout.splitlines() if "median_filter" in row)
    assert "defense" in line and "bench-median-filter" in line and "0.1.0" in line

    suite = write_suite(
        tmp_path / "third.toml", defenses=["none", {"name": "median_filter", "kernel": 3}], store=tmp_path / "r.db"
    )
    run = subprocess.run(
        [sys.executable, "-m", "bench.cli", "run", str(suite), "--cache-dir", str(tmp_path / "c")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 succeeded, 0 failed" in run.stdout


def test_every_builtin_plugin_has_a_description_and_documented_typed_options(registry):
    from bench.options import describe

    for info in registry.all():
        if info.package != "robustness-bench":
            continue
        assert info.description and len(info.description) < 120, info.name
        for option in describe(info.cls.Options):
            assert option["doc"], f"{info.kind} {info.name}: option {option['name']} has no doc line"
            assert option["type"] in ("int", "float", "bool", "str") or option["type"].startswith(
                ("one of", "list of")
            ), f"{info.kind} {info.name}: option {option['name']} has type {option['type']}"


def registry_with(tmp_path, monkeypatch, source: str):
    """A registry with the built-ins and one third-party module (its own name per test, since
    Python caches imported modules), registered under the entry point 'third_plugin'."""
    module = "third_" + "".join(c if c.isalnum() else "_" for c in tmp_path.name)
    fake_distribution(tmp_path, "third", {module: source}, {"third_plugin": module})
    monkeypatch.syspath_prepend(str(tmp_path))
    return build_registry(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


HEADER = """
import enum
from dataclasses import dataclass
import bench
"""


@pytest.mark.parametrize(
    "options, expected",
    [
        ("@dataclass(frozen=True)\n    class Options:\n        k: int", "Options.k has no default"),
        ("@dataclass\n    class Options:\n        k: int = bench.option(3, 'k')", "must be frozen"),
        ("class Options:\n        k = 3", "must be a dataclass"),
        ("@dataclass(frozen=True)\n    class Options:\n        k: tuple = bench.option((1, 2), 'k')", "has type tuple"),
        (
            "@dataclass(frozen=True)\n    class Options:\n        k: int = bench.option(0, 'k', min=1)",
            "the default is invalid",
        ),
    ],
)
def test_bad_options_are_refused_at_registration_naming_the_class_and_field(tmp_path, monkeypatch, options, expected):
    source = (
        HEADER
        + f"""
class Bad(bench.Defense):
    name = "bad"
    description = "bad options"
    {options}

class Good(bench.Defense):
    name = "good_after_bad"
    description = "registered after the bad one"

@bench.hookimpl
def register_defenses(register):
    register(Bad)
    register(Good)
"""
    )
    registry = registry_with(tmp_path, monkeypatch, source)
    problem = next(p for p in registry.problems if p.plugin == "third_plugin")
    assert expected in problem.message and "defense 'bad'" in problem.message
    assert "good_after_bad" in registry.names("defense")  # one bad class hides nothing after it
    with pytest.raises(bench_errors().UnknownPluginError, match="plugins that failed to load: third_plugin"):
        registry.get("defense", "bad")


def bench_errors():
    import bench.errors

    return bench.errors


def test_hooks_that_would_never_be_called_are_reported(tmp_path, monkeypatch):
    source = (
        HEADER
        + """
def register_defenses(register):
    pass

def register_defences(register):
    pass
"""
    )
    registry = registry_with(tmp_path, monkeypatch, source)
    messages = " ".join(p.message for p in registry.problems if p.plugin == "third_plugin")
    assert "register_defenses() is not decorated with @bench.hookimpl" in messages
    assert "register_defences() is not a hook (did you mean 'register_defenses'?)" in messages


def test_a_clashing_name_is_an_error_when_a_suite_uses_it(tmp_path, monkeypatch):
    source = (
        HEADER
        + """
class MyNone(bench.Defense):
    name = "none"
    description = "clashes with the built-in"

@bench.hookimpl
def register_defenses(register):
    register(MyNone)
"""
    )
    registry = registry_with(tmp_path, monkeypatch, source)
    with pytest.raises(bench_errors().UnknownPluginError, match="duplicates the one from robustness-bench.*ambiguous"):
        registry.get("defense", "none")


def test_an_error_in_post_init_is_a_one_line_option_error(tmp_path, monkeypatch):
    source = (
        HEADER
        + """
class Odd(bench.Defense):
    name = "odd"
    description = "odd kernels only"

    @dataclass(frozen=True)
    class Options:
        kernel: int = bench.option(3, "odd window", min=1)

        def __post_init__(self):
            if self.kernel % 2 == 0:
                raise ValueError(f"kernel must be odd, got {self.kernel}")

@bench.hookimpl
def register_defenses(register):
    register(Odd)
"""
    )
    registry = registry_with(tmp_path, monkeypatch, source)
    from bench.options import parse_options

    with pytest.raises(bench_errors().OptionError, match="s.toml: defenses.0.: kernel must be odd, got 4"):
        parse_options(registry.get("defense", "odd").cls.Options, {"kernel": 4}, "s.toml: defenses[0]")


def test_defenses_can_be_tested_directly_on_a_small_trained_model():
    from bench.evaluation import clean_accuracy
    from bench_plugins.testing import trained_digits_model
    from bench_plugins.defenses.finetune import FineTune

    model, splits, ctx = trained_digits_model(epochs=2)
    before = clean_accuracy(model, splits.test, ctx)
    assert before > 0.5  # trained: far above chance (10%)
    bonafide = splits.test.subset(torch.arange(100))
    tuned = FineTune(FineTune.Options(epochs=1, samples_per_epoch=0)).apply(model, bonafide, ctx)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(tuned.state_dict().values(), trained_digits_model(epochs=2)[0].state_dict().values())
    )


def test_the_example_plugin_refuses_an_even_kernel_when_the_suite_is_read(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    import bench_median_filter
    from bench.errors import OptionError
    from bench.options import parse_options

    with pytest.raises(OptionError, match="s.toml: defenses.0.: kernel must be odd, got 4"):
        parse_options(bench_median_filter.MedianFilter.Options, {"kernel": 4}, "s.toml: defenses[0]")


@pytest.mark.third_party_plugins  # (the module's mark, restated: this test checks what it switches)
def test_unmarked_tests_see_only_this_projects_plugins(tmp_path, monkeypatch, request):
    """What tests/conftest.py does for every test without the mark: an installed third-party
    package's plugins are not loaded, the built-ins are."""
    from conftest import BUILTIN_ENTRY_POINTS

    fake_distribution(tmp_path, "stray", {"stray_plugin": "import bench\n"}, {"stray": "stray_plugin"})
    monkeypatch.syspath_prepend(str(tmp_path))
    installed = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    assert "stray" in {ep.name for ep in installed}
    monkeypatch.setenv("BENCH_LOAD_PLUGINS", BUILTIN_ENTRY_POINTS)
    registry = build_registry(installed)
    assert {p.package for p in registry.all()} == {"robustness-bench"} and registry.names("analysis")
    assert not registry.problems


def test_a_plugin_module_without_hooks_is_reported(tmp_path, monkeypatch):
    fake_distribution(tmp_path, "hookless", {"hookless_plugin": "import bench\n"}, {"hookless": "hookless_plugin"})
    monkeypatch.syspath_prepend(str(tmp_path))
    problems = {p.plugin: p for p in build_registry(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)).problems}
    assert "implements none of the hooks (register_analyses, register_attacks" in problems["hookless"].message
    assert "it registers nothing" in problems["hookless"].message


def test_the_catalog_sees_an_edit_in_a_submodule_the_plugin_imports(tmp_path):
    site, cache = tmp_path / "site", tmp_path / "cache"
    package = site / "bench_sharpen"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "import bench\nfrom bench_sharpen.classes import Sharpen\n\n"
        "@bench.hookimpl\ndef register_defenses(register):\n    register(Sharpen)\n"
    )
    classes = 'import bench\n\nclass Sharpen(bench.Defense):\n    name = "sharpen"\n    description = "{}"\n'
    (package / "classes.py").write_text(classes.format("first"))
    info = site / "bench_sharpen-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bench-sharpen\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nsharpen = bench_sharpen\n")
    assert catalog_in_subprocess(site, cache)["descriptions"]["sharpen"] == "first"
    (package / "classes.py").write_text(classes.format("second, a longer description"))
    assert catalog_in_subprocess(site, cache)["descriptions"]["sharpen"] == "second, a longer description"
