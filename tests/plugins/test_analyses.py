"""The analysis plugin kind and the built-in analyses: the maths checked against known answers,
the kind run end to end through suites, the store, the report and the model cache."""

import copy
import importlib.metadata
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import bench
from bench.cli import main
from bench.suite import load_suite
from bench.registry import ENTRY_POINT_GROUP, build_registry
from bench_plugins.testing import run_suite_file, trained_digits_model, write_suite
from bench_plugins.analyses.budget_curve import budget_findings
from bench_plugins.analyses.robust_path import (
    CORRELATION_LEVEL,
    barrier_interval,
    correlation_test,
    input_hessian_top_eigenvalues,
    path_findings,
    pearson,
)
from bench_plugins.analyses.stitching import DonorBatchNorm, Init, stitch, stitch_points, stitching_findings
from bench.evaluation import clean_accuracy

TINY = {"name": "small_cnn", "width": 4}
TINY_ANALYSES = [
    {"name": "budget_curve", "eps": [0.0, 0.1], "steps": 2, "eot_samples": 2, "passes": 2, "images": 40},
    {
        "name": "robust_path",
        "epochs": 1,
        "samples_per_epoch": 128,
        "path_points": 3,
        "robust_eps": 0.1,
        "robust_epochs": 1,
        "robust_images": 200,
        "eps": 0.1,
        "pgd_steps": 2,
        "images": 40,
        "hessian_images": 8,
        "power_iterations": 3,
    },
    {
        "name": "stitching",
        "epochs": 1,
        "train_images": 100,
        "robust_eps": 0.1,
        "robust_epochs": 1,
        "robust_images": 200,
        "eps": 0.1,
        "pgd_steps": 1,
        "images": 40,
    },
]


def test_power_iteration_finds_the_top_eigenvalue_of_each_images_quadratic_loss():
    """loss_i(x) = 0.5 x^T (i+1) A x with A's eigenvalues 5, 2, 1, 0.5: image i's input Hessian
    is (i+1) A, whose top eigenvalue is 5 (i+1)."""
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    a = q @ torch.diag(torch.tensor([5.0, 2.0, 1.0, 0.5], dtype=torch.float64)) @ q.T
    scale = torch.arange(1, 4, dtype=torch.float64)

    def loss_sum(x):  # x [3, 1, 2, 2]: each image flattened to 4 values
        flat = x.flatten(1)
        return 0.5 * (scale * ((flat @ a) * flat).sum(dim=1)).sum()

    x = torch.randn(3, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    eigenvalues, residual = input_hessian_top_eigenvalues(
        loss_sum, x, iterations=60, generator=torch.Generator().manual_seed(2)
    )
    assert eigenvalues.tolist() == pytest.approx([5.0, 10.0, 15.0], rel=1e-6)
    assert residual < 1e-6
    _, early = input_hessian_top_eigenvalues(loss_sum, x, iterations=2, generator=torch.Generator().manual_seed(2))
    assert early > residual  # the residual tells an unconverged estimate apart


def test_pearson_matches_numpy():
    a, b = [0.1, 0.5, 0.2, 0.9, 0.4], [1.0, 2.5, 0.7, 3.9, 2.0]
    assert pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1])
    assert np.isnan(pearson([1, 1, 1], [1, 2, 3]))


def test_stitching_a_network_to_itself_recovers_its_accuracy_and_leaves_both_unchanged(one_cpu_thread):
    model, splits, ctx = trained_digits_model(epochs=3)
    before = copy.deepcopy(model.state_dict())
    own = clean_accuracy(model, splits.test, ctx)
    layers = stitch_points(model)
    assert len(layers) == 4  # three ReLUs and the flattening
    for layer in layers:
        stitched = stitch(
            model,
            model,
            layer,
            splits.train.subset(torch.arange(300)),
            ctx,
            epochs=1,
            lr=1e-3,
            batch_size=64,
            init=Init.IDENTITY,
            donor_batch_norm=DonorBatchNorm.FROZEN,
        )
        assert abs(clean_accuracy(stitched, splits.test, ctx) - own) <= 0.02, layer
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for p in stitched.front.parameters():
        assert not p.requires_grad


def test_findings_follow_their_rules():
    def path(losses, eigenvalues=None):
        eigenvalues = eigenvalues or [0.0] * len(losses)
        return [
            {"path": "curve", "t": i, "adv_loss": v, "hessian_eig": e}
            for i, (v, e) in enumerate(zip(losses, eigenvalues))
        ] + [{"path": "line", "t": i, "adv_loss": 0.9, "hessian_eig": 0.0} for i in range(len(losses))]

    values = {
        "adv_loss_barrier": 0.5,
        "adv_loss_barrier_low": 0.2,
        "adv_loss_barrier_high": 0.8,
        "pearson_curve": 0.99,
        "pearson_line": 0.9,
        "pearson_steps_curve": 0.1,
        "correlation_p_curve": 0.4,
    }
    barrier, correlation = path_findings(path([1.0, 1.5, 0.5]), values)
    assert barrier.shown and "barrier 0.50 on the curve (95% bootstrap interval over images 0.20 to 0.80)" in (
        barrier.evidence
    )
    assert not correlation.shown  # a high r of the levels alone shows nothing
    assert path_findings(path([1.0, 1.5, 0.5]), {**values, "correlation_p_curve": 0.01})[1].shown
    # a barrier within its noise is not shown, however large
    assert not path_findings(path([1.0, 1.5, 0.5]), {**values, "adv_loss_barrier_low": -0.1})[0].shown
    assert not path_findings(path([1.0, 1.02, 0.5]), {**values, "adv_loss_barrier": 0.02})[0].shown

    def per_image(undefended, plain, eot, images=100, eps=0.03):  # correct images, by index range
        return {
            (eps, attack): (torch.arange(images) < correct).float()
            for attack, correct in (
                ("undefended", undefended),
                ("defended, plain PGD", plain),
                ("defended, EOT-PGD", eot),
            )
        }

    no_more_robust, overstated = budget_findings(per_image(10, 40, 11), "sap")
    assert no_more_robust.shown and overstated.shown  # one image more: below the 3-point margin, p = 0.024
    assert "100 images" in no_more_robust.evidence and "0.03: +1.0 ± 1.0 points, p = 0.024" in no_more_robust.evidence
    no_more_robust, overstated = budget_findings(per_image(10, 21, 20), "sap")
    assert not no_more_robust.shown and not overstated.shown


def test_a_fixed_effect_cannot_be_shown_absent_by_cutting_the_images():
    # EOT accuracy 3 points above the undefended model's: that is the margin, never "no more robust".
    # Under the old rule (within two standard errors) cutting 400 images to 100 made it shown.
    for images in (400, 100, 40):
        correct = {"undefended": images // 10, "defended, EOT-PGD": images // 10 + 3 * images // 100}
        per_image = {
            (0.03, attack): (torch.arange(images) < correct.get(attack, images // 2)).float()
            for attack in ("undefended", "defended, plain PGD", "defended, EOT-PGD")
        }
        assert not budget_findings(per_image, "sap")[0].shown, images
    # several eps: each is tested at 0.05 / their number (here p = 0.046 at each)
    one_eps = {
        (0.03, a): (torch.arange(90) < c).float()
        for a, c in (("undefended", 10), ("defended, plain PGD", 40), ("defended, EOT-PGD", 11))
    }
    two_eps = one_eps | {(0.06, a): v for (_, a), v in one_eps.items()}
    assert budget_findings(one_eps, "sap")[0].shown and not budget_findings(two_eps, "sap")[0].shown


def test_random_monotone_curves_fail_the_correlation_rule_and_a_shared_bump_passes():
    generator = np.random.default_rng(0)
    passed = old_rule_passed = 0
    for _ in range(200):
        a, b = np.sort(generator.random(11)), np.sort(generator.random(11))
        old_rule_passed += pearson(list(a), list(b)) >= 0.7  # their levels correlate by construction
        passed += correlation_test(list(a), list(b))[1] < CORRELATION_LEVEL
    assert old_rule_passed / 200 > 0.9 and passed / 200 < 0.12  # about the test's level
    t = np.linspace(0, 1, 11)
    bump = np.exp(-(((t - 0.4) / 0.12) ** 2))
    eigen, loss = bump + 0.05 * generator.standard_normal(11), 2 * bump + 0.1 * generator.standard_normal(11)
    r, p = correlation_test(list(eigen), list(loss))
    assert r > 0.8 and p < CORRELATION_LEVEL


def test_the_barrier_interval_covers_the_barrier_and_shrinks_with_images():
    generator = torch.Generator().manual_seed(0)
    losses = torch.tensor([1.0, 1.3, 1.6, 1.3, 1.0]).unsqueeze(1) + torch.randn(5, 400, generator=generator)
    low, high = barrier_interval(losses)
    barrier = float(losses.mean(dim=1).max() - losses.mean(dim=1)[[0, -1]].max())
    assert low < barrier < high and low > 0
    few_low, few_high = barrier_interval(losses[:, :25])
    assert few_high - few_low > high - low


def test_stitching_findings_need_intervals_and_a_resolvable_denominator():
    def stitched(robust_to_regular, regular_to_robust, back=0.5):
        return [
            {"pair": pair, "rel_robust": v, "robust_acc": v * back, "rel_clean": 1.0}
            for pair, values in (("robust -> regular", robust_to_regular), ("regular -> robust", regular_to_robust))
            for v in values
        ]

    def own(back=0.5):
        return {"regular": {"robust_acc": back}, "robust": {"robust_acc": back}}

    dipping = stitched([0.9, 0.2, 0.6], [0.8, 0.1, 0.5])
    clean, dip = stitching_findings(dipping, {"rel_clean_min": 0.95}, own(), images=1000)
    assert clean.shown and dip.shown and "robust -> regular: relative robust accuracy by layer 0.90 [" in dip.evidence
    clean, dip = stitching_findings(
        stitched([0.9, 0.2, 0.6], [0.8, 0.4, 0.3]), {"rel_clean_min": 0.8}, own(), images=1000
    )
    assert not clean.shown and not dip.shown  # regular -> robust never falls below half
    # the same shape on 20 images: the intervals cannot tell the dip from the return
    assert not stitching_findings(dipping, {"rel_clean_min": 0.95}, own(), images=20)[1].shown
    # a back network at 3% robust accuracy is no denominator
    low_back = stitched([0.9, 0.2, 0.6], [0.8, 0.1, 0.5], back=0.03)
    dip = stitching_findings(low_back, {"rel_clean_min": 0.95}, own(0.03), images=1000)[1]
    assert not dip.shown and "too low to divide by" in dip.evidence


def test_stitching_trains_as_the_reference_does_donor_batch_norm_in_train_mode(tmp_path):
    model, splits, ctx = trained_digits_model(epochs=1, width=4)
    train = splits.train.subset(torch.arange(300))
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in bn]
    layer = stitch_points(model)[0]
    moving = stitch(model, copy.deepcopy(model), layer, train, ctx, epochs=1, lr=1e-3, batch_size=64)
    frozen = stitch(
        model,
        copy.deepcopy(model),
        layer,
        train,
        ctx,
        epochs=1,
        lr=1e-3,
        batch_size=64,
        donor_batch_norm=DonorBatchNorm.FROZEN,
        init=Init.IDENTITY,
    )
    assert all(torch.equal(m.running_mean, b) for m, b in zip(bn, before))  # the donors are copies
    stitched_bn = [m for m in moving.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    frozen_bn = [m for m in frozen.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert any(not torch.equal(m.running_mean, b) for m, b in zip(stitched_bn, before))
    assert all(torch.equal(m.running_mean, b) for m, b in zip(frozen_bn, before))
    # random initialisation is not the identity; the identity stays near it after a short training
    weight = moving.stitch.weight.flatten(1)
    assert not torch.allclose(weight, torch.eye(weight.shape[0]), atol=0.1)
    assert torch.allclose(frozen.stitch.weight.flatten(1), torch.eye(weight.shape[0]), atol=0.2)


def test_an_analysis_suite_runs_stores_reports_and_resumes(tmp_path, one_cpu_thread):
    suite = write_suite(
        tmp_path / "analyses.toml",
        models=[TINY],
        attacks=(),
        defenses=(),
        analyses=TINY_ANALYSES,
        training={"epochs": 2},
    )
    rows = run_suite_file(suite, tmp_path)
    assert [r["analysis"] for r in rows] == sorted(
        ["budget_curve", "robust_path", "stitching"], key=lambda n: [r["analysis"] for r in rows].index(n)
    )
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    by_name = {r["analysis"]: r for r in rows}
    points = by_name["robust_path"]["series"]["points"]
    assert {(p["path"], p["t"]) for p in points} == {(path, t) for path in ("curve", "line") for t in (0, 0.5, 1)}
    assert {"clean_acc", "robust_acc", "clean_loss", "adv_loss", "hessian_eig"} <= set(points[0])
    curve = by_name["budget_curve"]["series"]["curve"]
    assert {r["attack"] for r in curve} == {"undefended", "defended, plain PGD", "defended, EOT-PGD"}
    assert all(r["stochastic"] for r in curve if r["attack"] != "undefended")  # sap is found stochastic
    stitched = by_name["stitching"]["series"]["stitched"]
    assert {r["pair"] for r in stitched} == {
        "robust -> regular",
        "regular -> robust",
        "robust -> robust",
        "regular -> regular",
    }

    out = tmp_path / "board" / "analyses.md"
    result = CliRunner().invoke(main, ["report", str(tmp_path / "results.db"), "--output", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    for name in ("budget_curve", "robust_path", "stitching"):
        assert f"## Analysis: {name}" in text
    # Each analysis says what its paper found and whether this run shows it, with the numbers.
    claims = [line for line in text.splitlines() if "**This run: " in line]
    assert len(claims) == 6 and all("(1/1 seeds; seed 0: " in c or "(0/1 seeds; seed 0: " in c for c in claims)
    assert any("adversarial (PGD) loss has a barrier" in c and "on the line; PGD loss at the ends" in c for c in claims)
    as_json = CliRunner().invoke(main, ["report", str(tmp_path / "results.db"), "--format", "json"])
    findings = {a["analysis"].split("(")[0]: a["findings"] for a in json.loads(as_json.output)["analyses"]}
    assert sorted(findings) == ["budget_curve", "robust_path", "stitching"]
    assert all(len(f) == 2 and f[0]["seeds"][0]["seed"] == 0 for f in findings.values())
    figures = list((tmp_path / "board" / "analyses-figures").glob("analysis-*.png"))
    assert len(figures) == 1 + 3 + 4  # budget curve, three along the paths, one per stitching pair
    again = CliRunner().invoke(
        main,
        [
            "run",
            str(suite),
            "--store",
            str(tmp_path / "results.db"),
            "--cache-dir",
            str(tmp_path / "artifacts"),
            "--device",
            "cpu",
            "--no-progress",
        ],
    )
    assert again.exit_code == 0 and "3 already in" in again.output and "0 to run" in again.output


def test_an_analysis_reuses_the_defended_model_a_leaderboard_job_built(tmp_path, one_cpu_thread):
    pgd = {
        "name": "pgd",
        "eps": 0.1,
        "step": 0.05,
        "steps": 2,
        "check_subset": 20,
        "check_steps_factor": 1,
        "check_restarts": 1,
        "check_square_queries": 0,
        "eot_samples": 2,
    }
    training = {"name": "adversarial_training"}  # its defaults, as budget_curve applies it
    curve = {
        "name": "budget_curve",
        "defense": "adversarial_training",
        "bonafide_size": 50,
        "eps": [0.1],
        "steps": 2,
        "images": 20,
    }
    suite = write_suite(
        tmp_path / "shared.toml", models=[TINY], attacks=[pgd], defenses=[training], analyses=[curve], bonafide_size=50
    )
    rows = run_suite_file(suite, tmp_path)
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    job, analysis = rows
    assert job["notes"]["defended_model_cache"] == "miss"
    assert analysis["notes"]["undefended_model_cache"] == "hit"  # the job trained it
    assert analysis["notes"]["defended_defense_cache"] == "hit"  # and adversarially trained it


@pytest.mark.parametrize(
    "entry, expected",
    [
        ({"name": "budget_curve", "defense": "nope"}, "unknown defense 'nope'"),
        ({"name": "budget_curve", "eps": []}, "eps: give at least one budget"),
        ({"name": "robust_path", "epoch": 3}, "epoch"),
        ({"name": "stitching", "epochs": 0}, "epochs"),
        ({"name": "analysis_x"}, "unknown analysis 'analysis_x'"),
    ],
)
def test_bad_analysis_options_fail_before_anything_runs(tmp_path, entry, expected):
    store = tmp_path / "never.db"
    suite = write_suite(tmp_path / "bad.toml", models=[TINY], attacks=(), defenses=(), analyses=[entry], store=store)
    result = CliRunner().invoke(main, ["run", str(suite), "--cache-dir", str(tmp_path / "c"), "--no-progress"])
    assert result.exit_code == 2, result.output
    assert expected in result.output and result.output.strip().count("\n") == 0
    assert not store.exists()


def test_a_model_an_analysis_cannot_cut_is_refused_before_anything_runs(tmp_path):
    store = tmp_path / "never.db"
    suite = write_suite(
        tmp_path / "bad.toml",
        models=[{"name": "preact_resnet18"}],
        attacks=(),
        defenses=(),
        analyses=[{"name": "stitching"}],
        store=store,
    )
    result = CliRunner().invoke(main, ["run", str(suite), "--cache-dir", str(tmp_path / "c"), "--no-progress"])
    assert result.exit_code == 2 and "nn.Sequential" in result.output, result.output
    assert not store.exists()


THIRD_PARTY = """
from dataclasses import dataclass
import torch
import bench
from bench.toolkit import clean_accuracy


class SeedSpread(bench.Analysis):
    name = "seed_spread"
    description = "clean accuracy of two seeds of the same model"
    metrics = (bench.Metric("gap", "accuracy gap", None, kind=bench.MetricKind.NUMBER),)

    @dataclass(frozen=True)
    class Options:
        offset: int = bench.option(1, "seed offset of the second model", min=1)

    def models(self):
        return {"a": bench.ModelRecipe(), "b": bench.ModelRecipe(seed_offset=self.options.offset)}

    def run(self, models, data, ctx):
        accs = {k: clean_accuracy(m, data.evaluation, ctx) for k, m in models.items()}
        return bench.AnalysisResult(values={"gap": abs(accs["a"] - accs["b"])},
                                    series={"accuracy": [{"seed_offset": i, "clean_acc": accs[k]}
                                                         for i, k in enumerate("ab")]},
                                    figures=[bench.Figure("accuracy", "seed_offset", ("clean_acc",), "by seed")])


@bench.hookimpl
def register_analyses(register):
    register(SeedSpread)
"""


def _third_party_registry(tmp_path, monkeypatch, source=THIRD_PARTY, entry="seed_spread", package="third-analysis"):
    """The registry with `source` installed as a package of its own (a module named after the
    test, so tests never share one), registered under `entry`."""
    module = package.replace("-", "_") + "_" + "".join(c if c.isalnum() else "_" for c in tmp_path.name)
    site = tmp_path / "site"
    site.mkdir()
    (site / f"{module}.py").write_text(source)
    info = site / f"{package.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{entry} = {module}\n")
    monkeypatch.syspath_prepend(str(site))
    return build_registry(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


@pytest.mark.third_party_plugins
def test_a_third_party_analysis_is_discovered_and_runs_like_a_built_in(tmp_path, monkeypatch, one_cpu_thread):
    registry = _third_party_registry(tmp_path, monkeypatch)
    info = registry.get("analysis", "seed_spread")
    assert (info.package, info.version) == ("third-analysis", "0.1")
    suite = write_suite(
        tmp_path / "third.toml", models=[TINY], attacks=(), defenses=(), analyses=[{"name": "seed_spread", "offset": 2}]
    )
    (row,) = run_suite_file(suite, tmp_path, registry=registry)
    assert row["status"] == "ok", row["error"]
    assert row["versions"]["analysis:seed_spread"] == "third-analysis 0.1"
    assert 0 <= row["metrics"]["gap"] <= 1 and len(row["series"]["accuracy"]) == 2


ATTACKED_ANALYSIS = """
import bench
from bench.toolkit import clean_accuracy

ATTACK = {"poison_rate": 0.1, "trigger_size": 2}


class RepairGap(bench.Analysis):
    name = "repair_gap"
    description = "clean accuracy of the leaderboard's attacked model and of its fine-tuned repair"
    metrics = (bench.Metric("gap", "accuracy gap", None, kind=bench.MetricKind.NUMBER),)

    def models(self):
        return {
            "attacked": bench.ModelRecipe(attack="badnets", attack_options=ATTACK),
            "repaired": bench.ModelRecipe(
                attack="badnets", attack_options=ATTACK, defense="finetune",
                options={"epochs": 1, "samples_per_epoch": 0}, bonafide_size=50,
            ),
        }

    def run(self, models, data, ctx):
        accs = {k: clean_accuracy(m, data.evaluation, ctx) for k, m in models.items()}
        return bench.AnalysisResult(values={"gap": abs(accs["attacked"] - accs["repaired"])})


@bench.hookimpl
def register_analyses(register):
    register(RepairGap)
"""


@pytest.mark.third_party_plugins
def test_an_analysis_measures_the_leaderboards_own_attacked_and_defended_models(tmp_path, monkeypatch, one_cpu_thread):
    registry = _third_party_registry(tmp_path, monkeypatch, ATTACKED_ANALYSIS, "repair_gap", "repair-gap")
    suite = write_suite(
        tmp_path / "s.toml",
        models=[TINY],
        defenses=["none", {"name": "finetune", "epochs": 1, "samples_per_epoch": 0}],
        bonafide_size=50,
        analyses=["repair_gap"],
    )
    rows = run_suite_file(suite, tmp_path, registry=registry)
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    (analysis,) = [r for r in rows if "analysis" in r]
    # the leaderboard's jobs ran first and built both models; the analysis read them from the cache
    assert analysis["notes"]["attacked_model_cache"] == "hit"
    assert analysis["notes"]["repaired_model_cache"] == "hit" and analysis["notes"]["repaired_defense_cache"] == "hit"
    job = [r for r in rows if r.get("defense") == "finetune"][0]
    assert 0 <= analysis["metrics"]["gap"] <= 1 and job["metrics"]["clean_acc"] > 0


@pytest.mark.third_party_plugins
def test_an_analysis_asking_for_the_suites_attacks_runs_once_per_attack_on_its_jobs_models(
    tmp_path, monkeypatch, one_cpu_thread
):
    source = ATTACKED_ANALYSIS.replace('attack="badnets", attack_options=ATTACK', "attack=bench.SUITE_ATTACKS")
    assert source.count("bench.SUITE_ATTACKS") == 2
    registry = _third_party_registry(tmp_path, monkeypatch, source, "repair_gap", "repair-gap")
    attacks = [{"name": "badnets", "poison_rate": 0.1, "trigger_size": 2}, {"name": "blended", "poison_rate": 0.1}]
    suite = write_suite(
        tmp_path / "s.toml",
        models=[TINY],
        attacks=attacks,
        defenses=["none", {"name": "finetune", "epochs": 1, "samples_per_epoch": 0}],
        bonafide_size=50,
        analyses=["repair_gap"],
    )
    rows = run_suite_file(suite, tmp_path, registry=registry)
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    analyses = {r["analysis_label"]: r for r in rows if "analysis" in r}
    assert sorted(analyses) == ["repair_gap / badnets(trigger_size=2)", "repair_gap / blended"]
    for row in analyses.values():  # each on the models its attack's jobs built
        assert row["notes"]["attacked_model_cache"] == "hit" and row["notes"]["repaired_defense_cache"] == "hit"


@pytest.mark.third_party_plugins
def test_a_suite_without_attacks_refuses_an_analysis_asking_for_them(tmp_path, monkeypatch):
    registry = _third_party_registry(
        tmp_path,
        monkeypatch,
        ATTACKED_ANALYSIS.replace('attack="badnets", attack_options=ATTACK', "attack=bench.SUITE_ATTACKS"),
        "repair_gap",
        "repair-gap",
    )
    suite = write_suite(tmp_path / "s.toml", models=[TINY], attacks=(), defenses=(), analyses=["repair_gap"])
    with pytest.raises(bench.SuiteError, match=r"asks for the suite's attacks .* no \[\[attacks\]\] table"):
        load_suite(suite, registry)
