"""Every backdoor attack runs from a suite on real CIFAR-10 images (the JPEG copy beside the
checkout) with the standard table's architecture, PreAct-ResNet-18 (narrowed to width 8 and cut
to 600 training images, one epoch, so that the CPU affords it), both target modes where an attack
has them: the triggers fit 3x32x32 images, the attacks' own networks (surrogates, robust models,
generators) build for them, and every attack reports its metrics. What each attack does is
tested on digits in its own file."""

from pathlib import Path

import pytest

from bench_plugins.testing import run_suite_file, write_suite

TARBALL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
SMALL_NETWORK = {"name": "small_cnn", "width": 8}
ATTACKS = [
    {"name": "badnets", "trigger_size": 3, "target_mode": "all_to_all"},
    {"name": "blended", "target_mode": "all_to_all"},
    {"name": "wanet"},
    {"name": "wanet", "target_mode": "all_to_all"},
    {"name": "input_aware", "generator_width": 8, "mask_epochs": 1},
    {"name": "sig"},
    {"name": "low_frequency", "surrogate_width": 8, "surrogate_epochs": 1, "search_steps": 5},
    {"name": "trojannn", "trigger_steps": 5, "retrain_epochs": 1},
    {
        "name": "label_consistent",
        "robust_model": SMALL_NETWORK["name"],
        "robust_width": 8,
        "robust_epochs": 1,
        "robust_steps": 2,
        "steps": 5,
    },
]


@pytest.mark.slow
@pytest.mark.skipif(not TARBALL.exists(), reason=f"no CIFAR-10 copy at {TARBALL}")
def test_every_backdoor_attack_runs_on_cifar10_with_preact_resnet18(tmp_path, monkeypatch, one_cpu_thread):
    monkeypatch.setenv("BENCH_CIFAR10_ROOT", str(TARBALL))
    suite = write_suite(
        tmp_path / "cifar.toml",
        datasets=[{"name": "cifar10", "train_images": 600, "test_images": 300}],
        models=[{"name": "preact_resnet18", "width": 8}],
        attacks=ATTACKS,
        defenses=["none"],
        training={"epochs": 1, "batch_size": 64},
    )
    rows = run_suite_file(suite, tmp_path)
    failed = {r["attack_label"]: r["error"].splitlines()[-1] for r in rows if r["status"] != "ok"}
    assert not failed, failed
    assert len(rows) == len(ATTACKS)
    for row in rows:
        assert 0 <= row["metrics"]["asr"] <= 1 and 0 <= row["metrics"]["clean_acc"] <= 1, row["attack_label"]
        assert row["notes"]["attacked_model_train_seconds"] > 0
