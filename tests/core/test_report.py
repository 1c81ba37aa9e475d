import itertools
from types import SimpleNamespace
import pytest

from click.testing import CliRunner

from bench.cli import main
from bench.report import render_report
from bench.jobs import Outcome
from bench.store import ResultStore

INFO = {
    "clean_acc": {
        "label": "C-Acc",
        "higher_is_better": True,
        "kind": "percent",
        "diagnostic": False,
        "doc": "clean accuracy",
    },
    "asr": {
        "label": "ASR",
        "higher_is_better": False,
        "kind": "percent",
        "diagnostic": False,
        "doc": "attack success rate",
    },
    "der": {"label": "DER", "higher_is_better": True, "kind": "percent", "diagnostic": False, "headline": True},
}


def fake_job(defense, seed, bonafide):
    def spec(name):
        return SimpleNamespace(name=name, label=name, config=lambda: {"name": name})

    return SimpleNamespace(
        table="results",  # the job protocol: where the store keeps it
        key=f"{defense}-{seed}-{bonafide}",
        suite="demo",
        dataset=spec("digits"),
        model=spec("small_cnn"),
        attack=spec("badnets"),
        defense=spec(defense),
        seed=seed,
        bonafide_size=bonafide,
        config=lambda: {"defense": defense, "seed": seed},
    )


def fill(store_path):
    results = {
        ("none", 0): (0.90, 1.00),
        ("none", 1): (0.92, 0.98),
        ("finetune", 0): (0.88, 0.20),
        ("finetune", 1): (0.86, 0.30),
    }
    with ResultStore(store_path) as store:
        for (defense, seed), (acc, asr) in results.items():
            metrics = {
                "clean_acc": acc,
                "asr": asr,
                "clean_acc_before": 0.9 + 0.02 * seed,
                "asr_before": 1.0 - 0.02 * seed,
                "der": 0.5,
            }
            store.record(
                fake_job(defense, seed, 0 if defense == "none" else 100),
                Outcome(
                    status="ok",
                    metrics=metrics,
                    metric_info=INFO,
                    timings={"defense": 1.0 + seed},
                    device="cpu (test)",
                    versions={"robustness-bench": "0.1.0", "torch": "2", "python": "3.11"},
                    notes={"data_source": "test data"},
                    started_at="2026-11-23T10:00:00",
                    finished_at="2026-11-23T10:01:00",
                ),
            )
        store.record(
            fake_job("finetune", 2, 100),
            Outcome(
                status="failed",
                error="RuntimeError: boom\ntrace",
                started_at="2026-11-23T10:02:00",
                finished_at="2026-11-23T10:03:00",
            ),
        )


def test_report_shows_mean_and_95_percent_interval_and_bolds_nothing_the_intervals_cannot_separate(tmp_path):
    fill(tmp_path / "r.db")
    text = render_report(tmp_path / "r.db")
    assert "## digits / small_cnn / badnets" in text
    none_row = next(line for line in text.splitlines() if "| none " in line)
    ft_row = next(line for line in text.splitlines() if "| finetune " in line)
    # 2 seeds, sample std 1.41 points: half-width t(0.975, 1) * 1.41 / sqrt(2) = 12.7
    assert "91.0 ± 12.7" in none_row and "99.0 ± 12.7" in none_row
    assert "25.0 ± 63.5" in ft_row  # ASR 20 and 30
    assert "**" not in none_row + ft_row  # 91 vs 87 and 25 vs 99 are not separated by two seeds
    assert "| 100 " in ft_row and "| -" in none_row
    assert "4 jobs" not in text and "5 jobs, 4 succeeded, 1 failed" in text
    assert "finetune bonafide=100 seed=2: RuntimeError: boom" in text
    assert "Attacked model, before any defense (2 seeds): C-Acc 91.0 ± 12.7, ASR 99.0 ± 12.7" in text
    assert "95% confidence interval over seeds" in text


def record_rows(store_path, values: dict, metric: str = "asr", info=None, notes=None):
    """Store one result per (defense, seed) with `metric` set to the given value."""
    with ResultStore(store_path) as store:
        for (defense, seed), value in values.items():
            store.record(
                fake_job(defense, seed, 0 if defense == "none" else 100),
                Outcome(
                    status="ok",
                    metrics={"clean_acc": 0.9, metric: value, **(notes or {}).get(("metrics", defense), {})},
                    metric_info=info or INFO,
                    timings={"defense": 1.0},
                    device="cpu",
                    notes=(notes or {}).get(defense, {}),
                    started_at="2026-11-23T10:00:00",
                    finished_at="2026-11-23T10:01:00",
                ),
            )


def test_rows_whose_intervals_overlap_share_a_rank_and_only_a_separated_best_is_bold(tmp_path):
    der = {"a": (0.10, 0.11, 0.12), "b": (0.11, 0.12, 0.13), "c": (0.50, 0.52, 0.54), "d": (0.51, 0.90, 0.20)}

    def ranks_and_rows(name, defenses):
        values = {(d, seed): v for d in defenses for seed, v in enumerate(der[d])}
        record_rows(tmp_path / name, values, metric="der")
        text = render_report(tmp_path / name)
        rows = {line.split("|")[2].strip(): line for line in text.splitlines() if "| 100 " in line}
        return {d: line.split("|")[1].strip() for d, line in rows.items()}, rows, text

    # d's interval is wide enough to overlap every other row's: one group, one rank
    ranks, _, _ = ranks_and_rows("r.db", "abcd")
    assert ranks == {"a": "1", "b": "1", "c": "1", "d": "1"}
    # without d: c is apart from a and b, which overlap each other
    ranks, rows, _ = ranks_and_rows("s.db", "abc")
    assert ranks == {"c": "1", "a": "2", "b": "2"}
    assert "**52.0 ± 5.0**" in rows["c"]  # 50, 52, 54: half-width t(0.975, 2) * 2 / sqrt(3) = 5.0 points
    ranks, rows, text = ranks_and_rows("t.db", "ab")
    assert ranks == {"a": "1", "b": "1"} and "**" not in rows["a"] + rows["b"]  # 12.0 vs 11.0 overlap
    assert "- b − a (bonafide 100): +1.0 points [+1.0, +1.0], 3 seeds: b higher" in text


def test_paired_comparisons_pair_by_seed(tmp_path):
    # b is always 2 points above a on the same seed, though seeds differ by 20 points
    a = {0: 0.50, 1: 0.70, 2: 0.90}
    values = {("a", s): v for s, v in a.items()} | {("b", s): v + 0.02 for s, v in a.items()}
    record_rows(tmp_path / "r.db", values, metric="der")
    text = render_report(tmp_path / "r.db")
    ranks = {line.split("|")[2].strip(): line.split("|")[1].strip() for line in text.splitlines() if "| 100 " in line}
    assert ranks == {"a": "1", "b": "1"}  # unpaired, their intervals overlap
    assert "- b − a (bonafide 100): +2.0 points [+2.0, +2.0], 3 seeds: b higher" in text
    values[("b", 1)] = 0.60  # now b is lower on one seed: the paired interval holds 0
    record_rows(tmp_path / "s.db", values, metric="der")
    assert "3 seeds: no difference shown" in render_report(tmp_path / "s.db")


def test_a_row_flagged_unreliable_is_never_ranked_above_an_unflagged_one_nor_bold(tmp_path):
    info = {
        "clean_acc": INFO["clean_acc"],
        "robust_acc": {"label": "Robust acc", "higher_is_better": True, "kind": "percent", "diagnostic": False},
        "unreliable": {"label": "Unreliable", "higher_is_better": False, "kind": "flag", "diagnostic": False},
    }
    values = {("masking", s): v for s, v in enumerate((0.82, 0.83, 0.81))}
    values |= {("honest", s): v for s, v in enumerate((0.40, 0.41, 0.42))}
    values |= {("weak", s): v for s, v in enumerate((0.10, 0.11, 0.12))}
    flags = {("metrics", "masking"): {"unreliable": 1.0}, ("metrics", "honest"): {"unreliable": 0.0}}
    record_rows(tmp_path / "r.db", values, metric="robust_acc", info=info, notes=flags)
    text = render_report(tmp_path / "r.db")
    masking = next(line for line in text.splitlines() if "| masking " in line)
    honest = next(line for line in text.splitlines() if "| honest " in line)
    ranks = {line.split("|")[2].strip(): line.split("|")[1].strip() for line in text.splitlines() if "| 100 " in line}
    assert ranks == {"honest": "1", "weak": "2", "masking": "3"}
    assert "**" not in masking and "**41.0 ± 2.5**" in honest  # the best unflagged row, apart from weak
    assert text.index("| honest ") < text.index("| masking ")


def test_report_is_deterministic_and_cli_writes_the_file(tmp_path):
    fill(tmp_path / "r.db")
    out = tmp_path / "board" / "demo.md"
    result = CliRunner().invoke(main, ["report", str(tmp_path / "r.db"), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text() == render_report(tmp_path / "r.db")


def test_report_on_a_missing_store_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(main, ["report", str(tmp_path / "none.db")])
    assert result.exit_code == 2
    assert "none.db: no such result store" in result.output


def test_report_draws_paths_and_bonafide_sweeps_and_links_them(tmp_path):
    with ResultStore(tmp_path / "r.db") as store:
        for seed in (0, 1):
            for bonafide in (50, 500):
                path = [{"t": t / 10, "clean_acc": 0.9, "asr": abs(t - 5) / 5} for t in range(11)]
                store.record(
                    fake_job("mcr", seed, bonafide),
                    Outcome(
                        status="ok",
                        metrics={"clean_acc": 0.9, "asr": 0.1 if bonafide == 500 else 0.4},
                        metric_info=INFO,
                        timings={"defense": 1.0},
                        series={"path": path},
                        device="cpu",
                        started_at="2026-11-23T10:00:00",
                        finished_at="2026-11-23T10:01:00",
                    ),
                )
    out = tmp_path / "board" / "demo.md"
    result = CliRunner().invoke(main, ["report", str(tmp_path / "r.db"), "--output", str(out)])
    assert result.exit_code == 0, result.output
    figures = sorted(p.name for p in (tmp_path / "board" / "demo-figures").glob("*.png"))
    assert [name[: -len("-0123456789.png")] for name in figures] == [
        "bonafide-digits-small-cnn-badnets-asr",
        "path-digits-small-cnn-badnets-mcr-50",
        "path-digits-small-cnn-badnets-mcr-500",
    ]
    text = out.read_text()
    for name in figures:
        assert f"](demo-figures/{name})" in text


def test_any_series_of_measured_points_is_drawn_whatever_its_name(tmp_path):
    """The report knows no plugin's series names: a third-party defense's `sweep` of measured
    points along `alpha` is drawn; a series of its own numbers (no metrics) is not."""
    with ResultStore(tmp_path / "r.db") as store:
        for seed in (0, 1):
            sweep = [{"alpha": a / 4, "clean_acc": 0.9, "asr": 1 - a / 4} for a in range(5)]
            own = [{"step": s, "loss": 1.0 / (s + 1)} for s in range(5)]
            store.record(
                fake_job("smoothing", seed, 100),
                Outcome(
                    status="ok",
                    metrics={"clean_acc": 0.9, "asr": 0.1},
                    metric_info=INFO,
                    timings={"defense": 1.0},
                    series={"sweep": sweep, "losses": own},
                    device="cpu",
                    started_at="2026-11-23T10:00:00",
                    finished_at="2026-11-23T10:01:00",
                ),
            )
    out = tmp_path / "demo.md"
    assert CliRunner().invoke(main, ["report", str(tmp_path / "r.db"), "--output", str(out)]).exit_code == 0
    (figure,) = (tmp_path / "demo-figures").glob("*.png")
    assert figure.name.startswith("sweep-digits-small-cnn-badnets-smoothing-100-")


def test_unreliable_rows_are_flagged_not_averaged(tmp_path):
    info = {**INFO, "unreliable": {"label": "Unreliable", "higher_is_better": False, "kind": "flag"}}
    with ResultStore(tmp_path / "r.db") as store:
        for defense, flags in (("sap", (1.0, 0.0)), ("none", (0.0, 0.0))):
            for seed, flag in enumerate(flags):
                store.record(
                    fake_job(defense, seed, 0),
                    Outcome(
                        status="ok",
                        metrics={"clean_acc": 0.9, "asr": 0.5, "unreliable": flag},
                        metric_info=info,
                        timings={"defense": 1.0},
                        device="cpu",
                        started_at="2026-11-23T10:00:00",
                        finished_at="2026-11-23T10:01:00",
                    ),
                )
    text = render_report(tmp_path / "r.db")
    assert "⚠ unreliable (1/2 seeds)" in next(line for line in text.splitlines() if "| sap " in line)
    assert "unreliable" not in next(line for line in text.splitlines() if "| none " in line)


def test_cells_render_by_kind_diagnostics_go_below_and_only_ranked_headline_columns_are_bold(tmp_path):
    info = {
        **INFO,
        "robust_acc_attack": {"label": "PGD acc", "higher_is_better": True, "kind": "percent", "diagnostic": True},
        "mcr_t": {"label": "t", "higher_is_better": None, "kind": "number", "diagnostic": False},
    }
    with ResultStore(tmp_path / "r.db") as store:
        for (defense, acc, t, seconds), seed in itertools.product(
            (("mcr", 0.8, 0.3, 5.0), ("finetune", 0.7, None, 1.0)), (0, 1, 2)
        ):
            acc += (seed - 1) * 0.001  # 3 seeds, 0.1 points apart
            metrics = {"clean_acc": acc, "asr": 0.1, "robust_acc_attack": acc - 0.1}
            if t is not None:
                metrics["mcr_t"] = t
            store.record(
                fake_job(defense, seed, 100),
                Outcome(
                    status="ok",
                    metrics=metrics,
                    metric_info=info,
                    timings={"defense": seconds},
                    device="cpu",
                    started_at="2026-11-23T10:00:00",
                    finished_at="2026-11-23T10:01:00",
                ),
            )
    text = render_report(tmp_path / "r.db")
    main, _, diagnostics = text.partition("Diagnostics (per attack; not ranked):")
    mcr_row = next(line for line in main.splitlines() if "| mcr " in line)
    ft_row = next(line for line in main.splitlines() if "| finetune " in line)
    assert "| 0.30 " in mcr_row and "**0.30" not in mcr_row  # a chosen value, not a percentage, never ranked
    assert "**80.0 ± 0.2**" in mcr_row  # ranked headline percentage, apart from the next row
    assert "5.00" in mcr_row and "1.00" in ft_row and "**1.00" not in ft_row  # times are not ranked
    assert "PGD acc" not in main.splitlines()[-3] and "PGD acc" in diagnostics
    diag_mcr = next(line for line in diagnostics.splitlines() if "| mcr " in line)
    assert "70.0" in diag_mcr and "**" not in diagnostics


def test_report_json_carries_the_markdown_tables_as_data(tmp_path):
    fill(tmp_path / "r.db")
    result = CliRunner().invoke(main, ["report", str(tmp_path / "r.db"), "--format", "json"])
    assert result.exit_code == 0, result.output
    import json

    data = json.loads(result.output)
    (table,) = data["tables"]
    assert (table["dataset"], table["model"], table["attack"]) == ("digits", "small_cnn", "badnets")
    rows = {row["defense"]: row for row in table["rows"]}
    assert rows["finetune"]["seeds"] == [0, 1] and rows["finetune"]["bonafide_size"] == 100
    asr = rows["finetune"]["metrics"]["asr"]
    assert asr["mean"] == pytest.approx(0.25) and asr["n"] == 2 and asr["label"] == "ASR"
    assert data["failed"][0]["error"] == "RuntimeError: boom"


def test_export_gives_one_row_per_job_with_stable_columns(tmp_path):
    import io

    import pandas as pd

    fill(tmp_path / "r.db")
    result = CliRunner().invoke(main, ["export", str(tmp_path / "r.db"), "--format", "csv"])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(io.StringIO(result.output))
    assert len(frame) == 5  # four ok jobs and the failed one
    for column in (
        "suite",
        "job_key",
        "status",
        "dataset",
        "attack_label",
        "defense",
        "seed",
        "bonafide_size",
        "metric.asr",
        "metric.asr_before",
        "metric.clean_acc",
        "time.defense",
        "device",
        "version.robustness-bench",
        "error",
        "started_at",
    ):
        assert column in frame.columns, column
    assert set(frame[frame.status == "ok"]["metric.asr"]) == {1.0, 0.98, 0.2, 0.3}
    out = tmp_path / "r.json"
    assert (
        CliRunner().invoke(main, ["export", str(tmp_path / "r.db"), "--format", "json", "-o", str(out)]).exit_code == 0
    )
    assert len(pd.read_json(out)) == 5


def test_a_store_from_a_newer_version_is_refused_and_an_older_one_migrated(tmp_path):
    import sqlite3

    fill(tmp_path / "r.db")
    with sqlite3.connect(tmp_path / "r.db") as con:
        con.execute("DROP TABLE analyses")
        con.execute("PRAGMA user_version = 0")  # as written before the schema had a version
    with ResultStore(tmp_path / "r.db", read_only=True) as store:
        assert store.analysis_rows() == [] and len(store.rows()) == 5
    with ResultStore(tmp_path / "r.db"):
        pass
    with sqlite3.connect(tmp_path / "r.db") as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == 1
        assert con.execute("SELECT count(*) FROM analyses").fetchone()[0] == 0
        con.execute("PRAGMA user_version = 99")
    result = CliRunner().invoke(main, ["report", str(tmp_path / "r.db")])
    assert result.exit_code == 2 and "newer robustness-bench" in result.output


def test_rows_are_ranked_by_the_headline_metric_with_none_as_the_reference(tmp_path):
    info = {**INFO, "ra": {"label": "RA", "higher_is_better": True, "kind": "percent", "diagnostic": False}}
    with ResultStore(tmp_path / "r.db") as store:
        for (defense, der), seed in itertools.product(
            (("none", 0.5), ("weak", 0.6), ("strong", 0.9), ("middling", 0.7)), (0, 1, 2)
        ):
            der += (seed - 1) * 0.001
            store.record(
                fake_job(defense, seed, 0 if defense == "none" else 100),
                Outcome(
                    status="ok",
                    metrics={"clean_acc": 0.9, "asr": 1 - der, "der": der},
                    metric_info=INFO,
                    timings={"defense": 1.0},
                    device="cpu",
                    notes={"methods": {"attack": {"name": "badnets", "paper": "https://arxiv.org/abs/1708.06733"}}},
                    started_at="2026-11-23T10:00:00",
                    finished_at="2026-11-23T10:01:00",
                ),
            )
    text = render_report(tmp_path / "r.db")
    order = [line.split("|")[2].strip() for line in text.splitlines() if line.startswith("| ") and "Rank" not in line]
    assert order == ["none", "strong", "middling", "weak"]
    ranks = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "Rank" not in line]
    assert ranks == ["ref", "1", "2", "3"]
    glossary = next(line for line in text.splitlines() if line.startswith("Ranked by DER"))
    assert "ASR: attack success rate" in glossary and "RA:" not in glossary  # only the columns it has
    assert "badnets ([paper](https://arxiv.org/abs/1708.06733))" in text
    del info


def test_labels_differing_only_in_case_get_their_own_figures_and_long_labels_fit(tmp_path):
    from bench.plots import figure_file

    first = figure_file(tmp_path, "path", "digits / cnn / BadNets 2x2", "mcr", 50)
    second = figure_file(tmp_path, "path", "digits / cnn / badnets-2x2", "mcr", 50)
    assert first != second and first.name.startswith("path-digits-cnn-badnets-2x2-")
    long = figure_file(tmp_path, "analysis", "x" * 5000, "title")
    assert len(long.name.encode()) < 100


def test_labels_cannot_become_links_emphasis_or_reversed_text():
    from bench.report import md

    assert md("see https://evil.example and www.evil.example") == (
        "see https&#58;//evil.example and www&#46;evil.example"
    )
    assert md("_em_ ~~gone~~ snake_case") == "\\_em\\_ \\~\\~gone\\~\\~ snake_case"
    assert md("abc\u202edef") == "abcU+202Edef"


def test_the_header_names_the_machine_a_result_was_computed_on(tmp_path):
    with ResultStore(tmp_path / "r.db") as store:
        store.record(
            fake_job("none", 0, 0),
            Outcome(
                status="ok",
                metrics={"clean_acc": 0.9, "asr": 1.0},
                metric_info=INFO,
                timings={"defense": 0.0},
                device="cpu (x86_64, 2 threads)",
                notes={"machine": "Some CPU, torch CPU capability AVX2"},
                started_at="2026-11-23T10:00:00",
                finished_at="2026-11-23T10:01:00",
            ),
        )
    assert "- Machine: Some CPU, torch CPU capability AVX2" in render_report(tmp_path / "r.db")


def test_a_job_records_its_machine():
    import torch

    from bench.stages import machine_description

    assert f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}" in machine_description(torch.device("cpu"))


def test_paired_differences_are_called_only_after_holms_adjustment(tmp_path):
    # b - a = 2, 3, 2.5 points on seeds 0-2: paired p = 0.013, called alone...
    a = {0: 0.50, 1: 0.70, 2: 0.90}
    b = {0: 0.52, 1: 0.73, 2: 0.925}
    alone = {("a", s): v for s, v in a.items()} | {("b", s): v for s, v in b.items()}
    record_rows(tmp_path / "r.db", alone, metric="der")
    assert "3 seeds: b higher (Holm-adjusted p = 0.013)" in render_report(tmp_path / "r.db")
    # ...but not among six comparisons of four noisy rows
    noisy = {("c", s): v for s, v in {0: 0.1, 1: 0.9, 2: 0.4}.items()}
    noisy |= {("d", s): v for s, v in {0: 0.8, 1: 0.2, 2: 0.6}.items()}
    record_rows(tmp_path / "s.db", alone | noisy, metric="der")
    text = render_report(tmp_path / "s.db")
    assert "- b − a (bonafide 100): +2.5 points [" in text and "b higher" not in text


def test_a_metric_describes_itself_glossary_and_ranking_come_from_the_store(tmp_path):
    # a third-party attack's own metric: its doc line is the glossary, its headline flag the ranking
    info = {
        "clean_acc": {**INFO["clean_acc"], "doc": "clean accuracy"},
        "leak": {
            "label": "Leak",
            "higher_is_better": False,
            "kind": "percent",
            "diagnostic": False,
            "doc": "share of secrets recovered",
            "headline": True,
        },
        "other": {"label": "Other", "higher_is_better": True, "kind": "percent", "diagnostic": False},
    }
    values = {("low", s): v for s, v in enumerate((0.10, 0.11, 0.12))}
    values |= {("high", s): v for s, v in enumerate((0.80, 0.81, 0.82))}
    record_rows(tmp_path / "r.db", values, metric="leak", info=info)
    text = render_report(tmp_path / "r.db")
    assert "Ranked by Leak" in text and "Leak: share of secrets recovered" in text
    ranks = {line.split("|")[2].strip(): line.split("|")[1].strip() for line in text.splitlines() if "| 100 " in line}
    assert ranks == {"low": "1", "high": "2"}  # lower is better for this metric


def test_bench_migrate_adds_descriptions_to_rows_stored_before_metrics_had_them(tmp_path):
    import json
    import sqlite3

    legacy = {k: {f: v for f, v in i.items() if f not in ("doc", "headline")} for k, i in INFO.items()}
    with ResultStore(tmp_path / "r.db") as store:
        for seed in (0, 1, 2):
            store.record(
                fake_job("finetune", seed, 100),
                Outcome(
                    status="ok",
                    metrics={"clean_acc": 0.9, "asr": 0.1 + 0.01 * seed, "der": 0.9},
                    metric_info=legacy,
                    timings={"defense": 1.0},
                    device="cpu",
                    started_at="2026-11-23T10:00:00",
                    finished_at="2026-11-23T10:01:00",
                ),
            )
    assert "Ranked by DER" in render_report(tmp_path / "r.db")  # the core's fallback for old rows
    result = CliRunner().invoke(main, ["migrate", str(tmp_path / "r.db")])
    assert result.exit_code == 0 and "3 row(s) updated" in result.output, result.output
    with sqlite3.connect(tmp_path / "r.db") as db:
        info = json.loads(db.execute("SELECT metric_info FROM results LIMIT 1").fetchone()[0])
    assert info["der"]["headline"] is True and info["asr"]["doc"] == "attack success rate"
    migrated = render_report(tmp_path / "r.db")
    assert "ASR: attack success rate" in migrated
    assert "Methods: badnets ([paper](https://arxiv.org/abs/1708.06733), [code](" in migrated  # links stored too
    assert "0 row(s) updated" in CliRunner().invoke(main, ["migrate", str(tmp_path / "r.db")]).output


def test_report_and_export_import_no_plugin_and_no_torch_and_render_the_same_without_plugins(tmp_path):
    import os
    import subprocess
    import sys

    fill(tmp_path / "r.db")
    probe = (
        "import sys; from pathlib import Path; from bench.report import render_report; "
        "import bench.export, bench.html; "
        f"text = render_report(Path({str(tmp_path / 'r.db')!r})); "
        "print('torch' in sys.modules, any(m.startswith('bench_plugins') for m in sys.modules)); print(text)"
    )
    env = {**os.environ, "BENCH_LOAD_PLUGINS": ""}  # no plugin loads, as on a machine without them
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    first, _, text = done.stdout.partition("\n")
    assert first == "False False"
    assert text.rstrip("\n") == render_report(tmp_path / "r.db").rstrip("\n")


def test_metrics_stored_as_null_do_not_break_the_report(tmp_path):
    # SQLite stores NaN as NULL: an older store can hold such a headline or flag
    values = {("a", s): v for s, v in enumerate((0.5, 0.6, 0.7))} | {("b", s): v for s, v in enumerate((0.4, 0.5, 0.6))}
    record_rows(tmp_path / "r.db", values, metric="der")
    import sqlite3

    with sqlite3.connect(tmp_path / "r.db") as db:
        db.execute("UPDATE metrics SET value = NULL WHERE name = 'der' AND job_key = 'b-1-100'")
    text = render_report(tmp_path / "r.db")
    assert "- a − b (bonafide 100)" in text and "2 seeds" in text


def test_labels_cannot_mention_or_mail():
    from bench.report import md

    assert md("ping @someone or me@example.com") == "ping &#64;someone or me&#64;example.com"


@pytest.mark.filterwarnings("ignore:No artists with labels")
def test_the_figures_draw_the_same_means_and_intervals_as_the_tables(tmp_path, monkeypatch):
    """One leaderboard model behind every output: the bonafide figure's points and error bars
    are the JSON (and markdown) cells' means and 95% intervals, for every defense and size."""
    import json

    import matplotlib.axes

    with ResultStore(tmp_path / "r.db") as store:
        for seed, size in itertools.product((0, 1, 2), (50, 100)):
            asr = 0.1 * seed + (0.3 if size == 50 else 0.05) + 0.01 * seed * seed
            store.record(
                fake_job("finetune", seed, size),
                Outcome(
                    status="ok",
                    metrics={"clean_acc": 0.9, "asr": asr, "clean_acc_before": 0.9, "asr_before": 1.0, "der": 0.5},
                    metric_info=INFO,
                    device="cpu (test)",
                    versions={"robustness-bench": "0.1.0"},
                    started_at="2026-11-23T10:00:00",
                    finished_at="2026-11-23T10:01:00",
                ),
            )
    drawn = {}

    def errorbar(self, xs, mean, yerr=None, label=None, **kwargs):
        drawn[label] = {x: (m, h) for x, m, h in zip(xs, mean, yerr)}

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", errorbar)
    out = tmp_path / "board.md"
    assert CliRunner().invoke(main, ["report", str(tmp_path / "r.db"), "-o", str(out)]).exit_code == 0
    data = json.loads(CliRunner().invoke(main, ["report", str(tmp_path / "r.db"), "--format", "json"]).output)
    cells = {row["bonafide_size"]: row["metrics"]["asr"] for row in data["tables"][0]["rows"]}
    assert set(drawn["finetune"]) == set(cells) == {50, 100}
    for size, (mean, half) in drawn["finetune"].items():
        assert mean == pytest.approx(100 * cells[size]["mean"])
        assert half == pytest.approx(100 * (cells[size]["ci_high"] - cells[size]["mean"]))
    assert "±" in out.read_text()


def test_the_columns_do_not_move_when_the_job_keys_change(tmp_path, monkeypatch):
    """Job keys are hashes of the configs: adding an option to a plugin changes every key, and
    with it the store's row order; the leaderboard's columns must stay where they were."""
    rendered = []
    for name, prefix in (("a.db", "0"), ("b.db", "z")):
        with ResultStore(tmp_path / name) as store:
            for index, (defense, value) in enumerate(
                (("zeta_defense", "zeta_value"), ("alpha_defense", "alpha_value"))
            ):
                job = fake_job(defense, 0, 100)
                job.key = (prefix if index == 0 else "5") + job.key  # the two orders differ between the stores
                info = {
                    **INFO,
                    value: {"label": value, "higher_is_better": None, "kind": "number", "diagnostic": False},
                }
                metrics = {
                    "clean_acc": 0.9,
                    "asr": 0.2,
                    "clean_acc_before": 0.9,
                    "asr_before": 1.0,
                    "der": 0.9,
                    value: 1.0,
                }
                store.record(
                    job,
                    Outcome(
                        status="ok",
                        metrics=metrics,
                        metric_info=info,
                        device="cpu (test)",
                        versions={"robustness-bench": "0.1.0"},
                        started_at="2026-11-23T10:00:00",
                        finished_at="2026-11-23T10:01:00",
                    ),
                )
        rendered.append(render_report(tmp_path / name))
    headers = [next(line for line in text.splitlines() if line.startswith("| Rank")) for text in rendered]
    assert headers[0] == headers[1]
    assert headers[0].index("alpha_value") < headers[0].index("zeta_value")


def test_the_attacked_models_training_time_is_shown_per_attack_and_not_as_defense_time(tmp_path):
    with ResultStore(tmp_path / "r.db") as store:
        for seed, seconds in ((0, 10.0), (1, 14.0)):
            store.record(
                fake_job("finetune", seed, 100),
                Outcome(
                    status="ok",
                    metrics={"clean_acc": 0.9, "asr": 0.2, "clean_acc_before": 0.9, "asr_before": 1.0, "der": 0.9},
                    metric_info=INFO,
                    timings={"defense": 3.0},
                    device="cpu (test)",
                    versions={"robustness-bench": "0.1.0"},
                    notes={"attacked_model_train_seconds": seconds},
                    started_at="2026-11-23T10:00:00",
                    finished_at="2026-11-23T10:01:00",
                ),
            )
    text = render_report(tmp_path / "r.db")
    assert "Attacked model training: 12.00 ± 25.41 s per model" in text
    assert "| 3.00 ± 0.00 " in text  # the defense time is the defense's alone
