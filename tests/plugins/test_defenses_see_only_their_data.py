"""No defense reads a test label, a test image or the attack's trigger: the core hands it the
data it declared and nothing else. Each backdoor defense runs twice through the pipeline, the
second time with every evaluation image replaced by noise and every evaluation label shuffled;
the model it returns must be the same, bit for bit. Its context has no field that could carry
the attack, its trigger or test data."""

import dataclasses
import hashlib

import pytest
import torch

import bench
import bench.stages
from bench_plugins.testing import run_suite_file, write_suite

# Each defense at a budget a unit test affords (the options a suite would give).
QUICK = {
    "finetune": {"epochs": 1, "samples_per_epoch": 0},
    "fine_pruning": {"epochs": 1, "samples_per_epoch": 0},
    "clp": {"u": 1.0},
    "nad": {"teacher_epochs": 1, "epochs": 1, "samples_per_epoch": 0, "betas": [50.0, 100.0, 100.0]},
    "ibau": {"rounds": 1, "samples_per_round": 50, "radius": 1.5},
    "ft_sam": {"epochs": 1, "samples_per_epoch": 0},
    "anp": {"iterations": 20},
    "rnp": {"unlearning_epochs": 2, "recovering_epochs": 1, "samples_per_epoch": 0},
    "neural_cleanse": {
        "reverse_epochs": 3,
        "reverse_samples_per_epoch": 60,
        "anomaly_threshold": 0.5,  # flag something, so that unlearning runs too
        "epochs": 1,
        "samples_per_epoch": 0,
    },
    "abl": {"isolation_epochs": 1, "finetuning_epochs": 1, "unlearning_epochs": 1},
    "activation_clustering": {"epochs": 1},
    "spectral_signature": {"epochs": 1},
}
RETURNED: dict[str, list[str]] = {}


def fingerprint(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("name", sorted(QUICK))
def test_the_defended_model_does_not_depend_on_the_evaluation_images_or_the_test_trigger(
    name, tmp_path, monkeypatch, registry, one_cpu_thread
):
    cls = registry.get("defense", name).cls
    original_apply = cls.apply

    def recording_apply(self, model, data, ctx):
        result = original_apply(self, model, data, ctx)
        returned = result.model if isinstance(result, bench.Defended) else result
        RETURNED.setdefault(name, []).append(fingerprint(returned))
        return result

    monkeypatch.setattr(cls, "apply", recording_apply)
    for run in ("plain", "scrambled"):
        if run == "scrambled":
            split = bench.stages.split_bonafide

            def scrambled_split(*args, **kwargs):
                bonafide, evaluation = split(*args, **kwargs)
                generator = torch.Generator().manual_seed(1)
                noise = torch.randint(0, 256, evaluation.x.shape, generator=generator, dtype=torch.uint8)
                labels = evaluation.y[torch.randperm(len(evaluation.y), generator=generator)]
                return bonafide, dataclasses.replace(evaluation, x=noise, y=labels)

            monkeypatch.setattr(bench.stages, "split_bonafide", scrambled_split)
        attack = {"name": "badnets", "poison_rate": 0.1, "trigger_size": 2}
        suite = write_suite(
            tmp_path / f"{run}.toml", attacks=[attack], defenses=[{"name": name, **QUICK[name]}], bonafide_size=60
        )
        (row,) = run_suite_file(suite, tmp_path / run)
        assert row["status"] == "ok", row["error"]
    plain, scrambled = RETURNED[name]
    assert plain == scrambled


def test_a_defense_context_carries_no_data_and_no_attack():
    fields = {f.name for f in dataclasses.fields(bench.DefenseContext)}
    assert fields == {
        "device",
        "seed",
        "num_classes",
        "eval_batch_size",
        "horizontal_flip",
        "show_progress",
        "cache_dir",
        "recipe",
        "attacked_model_with_seed",
    }
