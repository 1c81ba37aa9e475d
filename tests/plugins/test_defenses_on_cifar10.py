"""Every backdoor defense runs from a suite on real CIFAR-10 images (the JPEG copy beside the
checkout) with the standard table's architecture, PreAct-ResNet-18 (narrowed to width 8 and
cut to 600 training images so that the CPU affords it): the graph rules (CLP's pairs, NAD's
stages, the neuron masks, the ART head) hold on it, not only on the digits CNN."""

from pathlib import Path

import pytest

from bench_plugins.testing import run_suite_file, write_suite
from test_defenses_see_only_their_data import QUICK

TARBALL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.mark.slow
@pytest.mark.skipif(not TARBALL.exists(), reason=f"no CIFAR-10 copy at {TARBALL}")
def test_every_backdoor_defense_runs_on_cifar10_with_preact_resnet18(tmp_path, monkeypatch, one_cpu_thread):
    monkeypatch.setenv("BENCH_CIFAR10_ROOT", str(TARBALL))
    suite = write_suite(
        tmp_path / "cifar.toml",
        datasets=[{"name": "cifar10", "train_images": 600, "test_images": 300}],
        models=[{"name": "preact_resnet18", "width": 8}],
        attacks=[{"name": "badnets", "poison_rate": 0.1, "trigger_size": 3}],
        defenses=["none", *({"name": name, **options} for name, options in sorted(QUICK.items()))],
        bonafide_size=100,
        training={"epochs": 1, "batch_size": 64},
    )
    rows = run_suite_file(suite, tmp_path)
    failed = {r["defense"]: r["error"].splitlines()[0] for r in rows if r["status"] != "ok"}
    assert not failed, failed
    assert {r["defense"] for r in rows} == {"none", *QUICK}
    data = {r["defense"]: r["notes"]["defender_data"] for r in rows}
    assert data["abl"] == "poisoned_training_set" and data["clp"] == "none" and data["nad"] == "bonafide"
