"""The README is part of the interface: its commands, plugins and hooks must match the code."""

from pathlib import Path

from bench import hookspecs

ROOT = Path(__file__).parent.parent.parent
README = (ROOT / "README.md").read_text()
TEST_COMMAND = "pip install -c constraints.txt -e '.[test]' && pytest"


def test_ci_runs_the_readme_test_command():
    assert TEST_COMMAND in README
    ci = (ROOT / ".ci" / "run").read_text()
    installs = [line for line in ci.splitlines() if line.startswith("pip install -c constraints.txt -e '.[")]
    assert len(installs) == 1 and "test" in installs[0].split("[")[1]  # once, with at least the test extra
    assert ci.strip().splitlines()[-1] == "pytest"  # the README's test command closes the run


def test_the_readme_is_a_front_door():
    assert len(README.splitlines()) <= 250, "README.md is over 250 lines: move details into docs/"
    for page in ("studies", "methods", "suites", "cli", "plugins", "store", "cluster"):
        assert (ROOT / "docs" / f"{page}.md").is_file() and f"{page}.md" in (ROOT / "mkdocs.yml").read_text()


def test_readme_quickstart_suite_exists():
    assert "bench run suites/quickstart.toml" in README
    assert (ROOT / "suites" / "quickstart.toml").is_file()


def test_every_builtin_plugin_is_documented(registry):
    for info in registry.all():
        if info.package == "robustness-bench":
            assert f"`{info.name}`" in README, f"{info.kind} {info.name} is missing from README.md"


def test_every_hook_is_documented():
    hooks = [name for name in dir(hookspecs) if name.startswith("register_")]
    assert len(hooks) == 5
    for name in hooks:
        assert name in README and getattr(hookspecs, name).__doc__


def test_readme_example_plugin_matches_the_shipped_example():
    source = (ROOT / "examples" / "bench-median-filter" / "bench_median_filter.py").read_text()
    start = source.index("class MedianFiltered")
    assert source[start:].strip() in README


def test_the_suite_in_the_readme_is_valid(registry):
    import tomllib

    from bench.expansion import expand
    from bench.expansion import expand_analyses
    from bench.suite import parse_suite

    start = README.index("## Writing a suite")
    block = README[
        README.index("```toml", start) + len("```toml") : README.index("```", README.index("```toml", start) + 7)
    ]
    suite = parse_suite(tomllib.loads(block), Path("my-suite.toml"), registry)
    jobs = expand(suite)
    # 3 seeds x 2 poison rates x (none once + finetune-short at each of the 3 bonafide sizes)
    assert len(jobs) == 3 * 2 * 4
    assert len(expand_analyses(suite)) == 3  # budget_curve once per seed


def test_every_committed_suite_is_valid_and_its_leaderboard_names_it(registry):
    from bench.expansion import expand, expand_analyses
    from bench.suite import load_suite

    for path in sorted((ROOT / "suites").glob("*.toml")):
        suite = load_suite(path, registry)
        count = len(expand(suite)) + len(expand_analyses(suite))
        assert count, path.name
        leaderboard = ROOT / "leaderboard" / f"{suite.name}.md"
        if leaderboard.is_file():  # a committed leaderboard comes from this suite, whole
            text = leaderboard.read_text()
            assert f"- Suite: {suite.name}; {count} jobs, {count} succeeded" in text


def test_python_minus_m_bench_is_the_cli():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "bench", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "Usage: bench" in result.stdout and "report" in result.stdout


def test_the_generated_cli_and_plugin_tables_are_fresh():
    from bench.docs import updated

    assert "<!-- generated: cli -->" in README and "<!-- generated: plugins -->" in README
    assert updated(README) == README, "README tables are stale: run python -m bench.docs --write"
