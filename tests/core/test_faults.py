"""Every fault is one failed job, never a dead suite, and nothing wrong reaches a leaderboard."""

import importlib.metadata
import os
import sys

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import bench
import bench.cli
from bench.cli import main
from bench.registry import ENTRY_POINT_GROUP, build_registry
from bench.report import render_report
from bench.store import ResultStore
from bench_plugins.testing import write_suite


class ExitingDefense(bench.Defense):
    name = "exits"
    description = "calls sys.exit(0) from its own code"

    def apply(self, model, bonafide, ctx):
        sys.exit(0)


class InterruptingDefense(bench.Defense):
    name = "interrupts"
    description = "raises KeyboardInterrupt from its own code"

    def apply(self, model, bonafide, ctx):
        raise KeyboardInterrupt


class NaNOutputs(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x) * float("nan")


class NaNDefense(bench.Defense):
    name = "nan_outputs"
    description = "returns a model whose outputs are all NaN"

    def apply(self, model, bonafide, ctx):
        return NaNOutputs(model)


class TensorMetricAttack(bench.Attack):
    name = "tensor_metric"
    description = "reports a tensor as a metric"
    metrics = (bench.Metric("robust_acc", "Robust acc", higher_is_better=True),)

    def evaluate(self, model, test, ctx, state):
        return {"robust_acc": torch.tensor([0.5, 0.5])}


class StringSeriesDefense(bench.Defense):
    name = "tensor_series"
    description = "reports a tensor in a series"

    def apply(self, model, bonafide, ctx):
        return bench.Defended(model, series={"steps": [{"value": torch.zeros(3)}]})


class NaNWhereSaturated(nn.Module):
    """NaN only for images whose 2x2 patch one pixel from the bottom-right corner is saturated
    (where the BadNets trigger sits): the clean images look fine, the triggered ones would all
    become class 0 under argmax."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        logits = self.model(x)
        saturated = (x[..., -3:-1, -3:-1].flatten(1) >= 1.0).all(dim=1, keepdim=True)
        return torch.where(saturated, torch.full_like(logits, float("nan")), logits)


class NaNWhereSaturatedDefense(bench.Defense):
    name = "nan_on_trigger"
    description = "NaN outputs only where pixels saturate"

    def apply(self, model, bonafide, ctx):
        return NaNWhereSaturated(model)


class ExitingCheckDefense(bench.Defense):
    name = "exits_in_check"
    description = "calls sys.exit(0) in check_model, before any job"

    def check_model(self, model, sample):
        sys.exit(0)


class InfiniteMetricAttack(bench.Attack):
    name = "infinite_metric"
    description = "reports inf and NaN metrics"
    metrics = (
        bench.Metric("robust_acc", "Robust acc", higher_is_better=True),
        bench.Metric("other", "Other", higher_is_better=True),
    )

    def evaluate(self, model, test, ctx, state):
        return {"robust_acc": float("inf"), "other": float("nan")}


@pytest.fixture
def registry(monkeypatch):
    registry = build_registry(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    for cls in (
        ExitingDefense,
        InterruptingDefense,
        NaNDefense,
        TensorMetricAttack,
        StringSeriesDefense,
        NaNWhereSaturatedDefense,
        InfiniteMetricAttack,
        ExitingCheckDefense,
    ):
        registry.register(cls, plugin="test", package="tests")
    monkeypatch.setattr(bench.cli, "load_plugins", lambda: registry)
    return registry


def run(tmp_path, **suite):
    path = write_suite(tmp_path / "s.toml", store=tmp_path / "r.db", **suite)
    result = CliRunner().invoke(main, ["run", str(path), "--cache-dir", str(tmp_path / "c"), "--no-progress"])
    with ResultStore(tmp_path / "r.db") as store:
        return result, {r["defense_label"] + "/" + r["attack_label"]: r for r in store.rows()}


def test_a_plugin_exiting_or_interrupting_fails_its_job_and_the_suite_goes_on(tmp_path, registry):
    result, rows = run(tmp_path, defenses=["exits", "interrupts", "none"])
    assert result.exit_code == 1, result.output
    assert rows["exits/badnets(trigger_size=2)"]["status"] == "failed"
    assert "SystemExit" in rows["exits/badnets(trigger_size=2)"]["error"]
    assert "KeyboardInterrupt" in rows["interrupts/badnets(trigger_size=2)"]["error"]
    assert rows["none/badnets(trigger_size=2)"]["status"] == "ok"


def test_nan_outputs_and_unstorable_values_fail_their_job_with_the_reason(tmp_path, registry):
    result, rows = run(tmp_path, defenses=["nan_outputs", "tensor_series", "none"])
    assert result.exit_code == 1, result.output
    assert "the defended model gives NaN or infinite outputs" in rows["nan_outputs/badnets(trigger_size=2)"]["error"]
    assert "a series cannot be stored" in rows["tensor_series/badnets(trigger_size=2)"]["error"]
    text = render_report(tmp_path / "r.db")
    table = text.split("## Failed jobs")[0]
    assert not [line for line in table.splitlines() if line.startswith("| nan_outputs")]  # never ranked


def test_a_plugin_exiting_in_check_model_is_a_one_line_refusal_not_a_silent_exit(tmp_path, registry):
    path = write_suite(tmp_path / "s.toml", store=tmp_path / "r.db", defenses=["exits_in_check"])
    result = CliRunner().invoke(main, ["run", str(path), "--cache-dir", str(tmp_path / "c"), "--no-progress"])
    assert result.exit_code == 2, result.output
    assert "defense 'exits_in_check': check_model failed: SystemExit" in result.output


def test_nan_only_on_triggered_images_fails_the_job_instead_of_ranking_first(tmp_path, registry):
    # the clean images almost never have that patch saturated: the old clean-only check passed
    result, rows = run(tmp_path, defenses=["nan_on_trigger", "none"])
    assert result.exit_code == 1, result.output
    row = rows["nan_on_trigger/badnets(trigger_size=2)"]
    assert row["status"] == "failed" and "gives NaN or infinite outputs on" in row["error"]
    assert "clean, triggered or adversarial" in row["error"]
    table = render_report(tmp_path / "r.db").split("## Failed jobs")[0]
    assert not [line for line in table.splitlines() if line.startswith("| nan_on_trigger")]


def test_a_non_finite_metric_fails_the_job_and_never_ranks(tmp_path, registry):
    result, rows = run(tmp_path, attacks=["infinite_metric"], defenses=["none"])
    assert result.exit_code == 1, result.output
    (row,) = rows.values()
    assert row["status"] == "failed"
    assert "attack 'infinite_metric' reported the metric 'robust_acc' = inf" in row["error"]


def test_a_tensor_metric_fails_the_job_not_the_store(tmp_path, registry):
    result, rows = run(tmp_path, attacks=["tensor_metric"], defenses=["none"])
    assert result.exit_code == 1, result.output
    (row,) = rows.values()
    assert "metric 'robust_acc' is a Tensor" in row["error"]


def test_a_diverged_attacked_model_fails_instead_of_predicting_class_zero(tmp_path, registry):
    result, rows = run(tmp_path, defenses=["none"], training={"epochs": 1, "lr": 1e30})
    (row,) = rows.values()
    assert row["status"] == "failed" and "the attacked model gives NaN or infinite outputs" in row["error"]


def test_the_report_shows_only_the_suites_latest_configuration(tmp_path, registry):
    path = write_suite(tmp_path / "s.toml", store=tmp_path / "r.db", training={"epochs": 1})
    args = ["run", str(path), "--cache-dir", str(tmp_path / "c"), "--no-progress"]
    assert CliRunner().invoke(main, args).exit_code == 0
    write_suite(tmp_path / "s.toml", store=tmp_path / "r.db", training={"epochs": 3})
    assert CliRunner().invoke(main, args).exit_code == 0
    latest = render_report(tmp_path / "r.db")
    assert "1 jobs, 1 succeeded" in latest and "Seeds   |" in latest
    assert "| 1       |" in latest  # one seed, not two mixed configurations
    everything = render_report(tmp_path / "r.db", all_runs=True)
    assert "2 jobs, 2 succeeded" in everything


def test_two_suites_in_one_store_never_mix_unless_one_is_chosen(tmp_path, registry):
    for name in ("first", "second"):
        path = write_suite(tmp_path / f"{name}.toml", store=tmp_path / "r.db")
        assert (
            CliRunner().invoke(main, ["run", str(path), "--cache-dir", str(tmp_path / "c"), "--no-progress"]).exit_code
            == 0
        )
    result = CliRunner().invoke(main, ["report", str(tmp_path / "r.db")])
    assert result.exit_code == 2 and "several suites (first, second); choose one with --suite" in result.output
    assert "# Leaderboard: second" in render_report(tmp_path / "r.db", suite="second")


def test_report_never_changes_the_store_and_refuses_bad_files(tmp_path, registry):
    run(tmp_path, defenses=["none"])
    store = tmp_path / "r.db"
    before = {p.name: p.read_bytes() for p in tmp_path.glob("r.db*")}
    os.chmod(store, 0o444)
    try:
        result = CliRunner().invoke(main, ["report", str(store)])
    finally:
        os.chmod(store, 0o644)
    assert result.exit_code == 0, result.output
    assert {p.name: p.read_bytes() for p in tmp_path.glob("r.db*")} == before
    (tmp_path / "junk.db").write_text("not a database")
    for args, expected in (
        (["report", str(tmp_path / "junk.db")], "not an SQLite file"),
        (["report", str(store), "--output", str(tmp_path)], "expected a markdown file name"),
        (["report", str(store), "--output", "."], "expected a markdown file name"),
    ):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and expected in result.output, result.output


def test_strings_from_suites_are_inert_in_the_markdown(tmp_path, registry):
    label = "evil | col\n## heading <script>alert(1)</script> [x](javascript:y)"
    run(tmp_path, defenses=[{"name": "none", "label": label}])
    text = render_report(tmp_path / "r.db")
    row = next(line for line in text.splitlines() if "evil" in line)
    header = next(line for line in text.splitlines() if line.startswith("| Rank"))
    assert row.replace("\\|", "").count("|") == header.count("|")  # no extra column
    assert "<script>" not in text and "&lt;script&gt;" in row
    assert "\n## heading" not in text and "\\[x\\]" in row


def test_a_store_opened_while_another_process_switches_it_to_wal_waits_instead_of_failing():
    """SQLite answers `PRAGMA journal_mode=WAL` with "database is locked" at once, without the
    busy timeout, while another connection switches the same new store: the store retries."""
    import sqlite3

    from bench.store import _enable_wal

    class Busy:
        def __init__(self, failures, message="database is locked"):
            self.failures, self.message, self.calls = failures, message, 0

        def execute(self, sql):
            self.calls += 1
            if self.calls <= self.failures:
                raise sqlite3.OperationalError(self.message)

    db = Busy(3)
    _enable_wal(db)
    assert db.calls == 4
    with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
        _enable_wal(Busy(1, "disk I/O error"))  # anything else is not waited out
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        _enable_wal(Busy(10**6), patience=0.2)  # nor a lock that outlasts the patience
