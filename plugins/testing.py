"""Helpers for testing plugins the way the built-ins are tested: write a small suite, run it
on the CPU, read the stored rows; or call a defense's `apply` directly on a small trained model.

    from bench_plugins.testing import write_suite, run_suite_file

    def test_my_defense(tmp_path):
        suite = write_suite(tmp_path / "suite.toml", defenses=["none", {"name": "my_defense"}])
        rows = run_suite_file(suite, tmp_path)
        assert all(r["status"] == "ok" for r in rows)

A row (`run_suite_file`'s result, one per job) is a dict with the job's identity (`suite`,
`dataset`, `model`, `attack`, `defense` and their `*_label`s, `seed`, `bonafide_size`),
`status` ("ok" or "failed"), `metrics` (key -> number, after the defense, plus `*_before`
and `der`), `metric_info` (key -> label, higher_is_better, kind, diagnostic), `timings`
(stage -> seconds), `series` (name -> list of dicts), `notes`, `config`, `device`,
`versions`, `error` (with the traceback, for failed jobs) and `started_at`/`finished_at`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from bench.registry import Registry, load_plugins
from bench.store import ResultStore

TINY_MODEL = {"name": "small_cnn", "width": 8}
TINY_ATTACK = {"name": "badnets", "poison_rate": 0.1, "trigger_size": 2}


def write_suite(
    path: str | Path,
    *,
    datasets: Sequence = ("digits",),
    models: Sequence = (TINY_MODEL,),
    attacks: Sequence = (TINY_ATTACK,),
    defenses: Sequence = ("none",),
    seeds: Sequence[int] = (0,),
    bonafide_size: int | list[int] = 50,
    training: dict | None = None,
    store: str | Path | None = None,
    exclude: Sequence[dict] = (),
    analyses: Sequence = (),
    **settings: Any,
) -> Path:
    """Write a suite file for a tiny CPU run (2 epochs unless `training` says otherwise). A
    suite of analyses only passes `attacks=(), defenses=()`."""
    path = Path(path)
    suite = {"name": path.stem, "seeds": list(seeds), "bonafide_size": bonafide_size, "device": "cpu", **settings}
    if store is not None:
        suite["store"] = str(store)
    tables = {"suite": suite, "training": training if training is not None else {"epochs": 2}}
    lines = []
    for name, table in tables.items():
        lines += [f"[{name}]", *_key_values(table), ""]
    for name, entries in (
        ("datasets", datasets),
        ("models", models),
        ("attacks", attacks),
        ("defenses", defenses),
        ("analyses", analyses),
        ("exclude", exclude),
    ):
        for entry in entries:
            entry = {"name": entry} if isinstance(entry, str) else entry
            lines += [f"[[{name}]]", *_key_values(entry), ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _key_values(table: dict) -> list[str]:
    # JSON literals of strings, numbers, booleans and flat lists are valid TOML.
    return [f"{key} = {json.dumps(value)}" for key, value in table.items()]


def trained_digits_model(epochs: int = 3, width: int = 8, seed: int = 0):
    """(a small CNN trained on clean digits, the digits splits, a `bench.DefenseContext` on the
    CPU): enough to call a defense's `apply(model, bonafide, ctx)` directly in a test."""
    import dataclasses

    import torch

    from bench.expansion import plugin_specs
    from bench.models import Classifier, InputShape
    from bench.training import train_classifier

    # the installed `digits` and `small_cnn` plugins, looked up like any plugin
    registry = load_plugins()
    (dataset,) = plugin_specs({"name": "digits"}, "dataset", "trained_digits_model", registry)
    (network,) = plugin_specs({"name": "small_cnn", "width": width}, "model", "trained_digits_model", registry)
    splits = dataset.instantiate().load()
    torch.manual_seed(seed)
    net = network.instantiate().build(InputShape(1, 8, 8, splits.num_classes))
    model = Classifier(net, splits.mean, splits.std)
    recipe = dataclasses.replace(network.cls.recipe, epochs=epochs)
    ctx = _cpu_context(splits, recipe, seed)
    train_classifier(model, splits.train, recipe, ctx, flip=False)
    return model.eval(), splits, ctx


def _cpu_context(splits, recipe, seed: int):
    """A quiet `bench.DefenseContext` on the CPU for the digits test helpers."""
    import torch

    from bench.context import DefenseContext

    return DefenseContext(
        device=torch.device("cpu"),
        seed=seed,
        num_classes=splits.num_classes,
        horizontal_flip=False,
        show_progress=False,
        recipe=recipe,
    )


def run_suite_file(
    suite_path: str | Path, workdir: str | Path, registry: Registry | None = None, **run_options: Any
) -> list[dict]:
    """Run a suite on the CPU with the store and model cache under `workdir`; return the rows
    (the jobs', then the analyses'; an analysis row has `analysis`, `analysis_label`, `metrics`
    (its values), `series`, `figures` and no attack, defense or bonafide size)."""
    from bench.runner import run_suite
    from bench.suite import load_suite

    registry = registry or load_plugins()
    workdir = Path(workdir)
    store = workdir / "results.db"
    run_suite(
        load_suite(suite_path, registry),
        registry,
        store_path=store,
        device="cpu",
        artifact_dir=workdir / "artifacts",
        show_progress=False,
        echo=lambda _: None,
        **run_options,
    )
    with ResultStore(store) as results:
        return results.rows() + results.analysis_rows()


@dataclass
class Backdoored:
    """A small CNN trained on digits poisoned by an attack (BadNets unless told), with what a
    defense test needs: the model, the splits, a `bench.DefenseContext` on the CPU, the
    defender's bonafide images and the evaluation images (the other half of the test set), the
    attack and its state. `asr(model)` and `accuracy(model)` measure a model on the evaluation
    images as the leaderboard would."""

    model: Any
    splits: Any
    ctx: Any
    bonafide: Any
    evaluation: Any
    attack: Any
    attack_state: dict
    poisoned_train: Any

    def asr(self, model) -> float:
        return self.attack.evaluate(model.eval(), self.evaluation, self.ctx, self.attack_state)["asr"]

    def accuracy(self, model) -> float:
        from bench.evaluation import clean_accuracy

        return clean_accuracy(model.eval(), self.evaluation, self.ctx)


def backdoored_digits_model(
    epochs: int = 8,
    width: int = 8,
    seed: int = 0,
    attack: dict | None = None,
    bonafide_size: int = 100,
    model: str = "small_cnn",
) -> Backdoored:
    """A `Backdoored` model for a defense's property test (a few seconds on one CPU thread):
    the named attack (default BadNets, 10% poisoned, 2x2 trigger) poisons the digits training
    set, the model trains `epochs` epochs with its recipe, and `bonafide_size` test images (a
    seeded half of the test set is the pool) go to the defender."""
    import dataclasses

    import torch

    from bench.bonafide import split_bonafide
    from bench.expansion import plugin_specs
    from bench.jobs import BonafideSource
    from bench.models import Classifier, InputShape
    from bench.training import train_classifier

    registry = load_plugins()
    (dataset,) = plugin_specs({"name": "digits"}, "dataset", "backdoored_digits_model", registry)
    options = {"width": width} if model == "small_cnn" else {}
    (network,) = plugin_specs({"name": model, **options}, "model", "backdoored_digits_model", registry)
    (attack_spec,) = plugin_specs(attack or TINY_ATTACK, "attack", "backdoored_digits_model", registry)
    splits = dataset.instantiate().load()
    recipe = dataclasses.replace(network.cls.recipe, epochs=epochs)
    ctx = _cpu_context(splits, recipe, seed)
    attack_plugin = attack_spec.instantiate()
    poisoned, state = attack_plugin.poison(splits.train, ctx)
    torch.manual_seed(seed)
    net = network.instantiate().build(InputShape(1, 8, 8, splits.num_classes))
    classifier = Classifier(net, splits.mean, splits.std)
    batches = None
    if attack_plugin.controls_training:  # the attacker is the trainer: every batch goes through it

        def batches(x, y, generator):
            return attack_plugin.training_batch(classifier, x, y, generator, ctx, state)

    train_classifier(classifier, poisoned, recipe, ctx, flip=False, batch_transform=batches)
    withheld = [state[k] for k in ("poisoned_indices", "reserved_indices") if k in state]
    bonafide, evaluation = split_bonafide(
        splits, torch.cat(withheld) if withheld else None, BonafideSource.TEST_HALF, bonafide_size, seed
    )
    return Backdoored(classifier.eval(), splits, ctx, bonafide, evaluation, attack_plugin, state, poisoned)
