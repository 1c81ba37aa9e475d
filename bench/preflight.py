"""Checks that only the data or the models reveal, run before anything is written (by `bench
run` and `bench run --dry-run` alike), with the same code the jobs use: the dataset loads, each
attack accepts it, each attack and defense accepts the model, and the defender's pool holds the
bonafide budget."""

from __future__ import annotations

import torch

from typing import Callable

from bench.artifacts import JobEnvironment, build_model, load_dataset
from bench.bonafide import bonafide_pool_size, check_bonafide_size
from bench.errors import BenchError, SuiteError
from bench.jobs import AnalysisJob, Job
from bench.suite import Suite


def preflight(suite: Suite, jobs: list[Job | AnalysisJob], env: JobEnvironment) -> None:
    """Problems that only the data or the model reveals, found before anything is written:
    missing files, options a dataset or model cannot satisfy (a target class it lacks, a layer
    it lacks), a bonafide budget larger than the defender's pool."""
    checked: set = set()
    models: dict = {}
    checks: dict[str, Callable[..., None]] = {"results": _check_job, "analyses": _check_analysis}
    for job in jobs:
        checks[job.table](suite, job, env, checked, models)


def _check_job(suite: Suite, job: Job, env: JobEnvironment, checked: set, models: dict) -> None:
    assert job.attack is not None  # a suite's jobs always have an attack
    where = f"{suite.path}: dataset '{job.dataset.label}', attack '{job.attack.label}'"
    try:
        splits = load_dataset(job, env.device)
    except BenchError as exc:
        raise SuiteError(f"{where}: {exc}") from None
    except (Exception, SystemExit) as exc:  # a plugin's own failure (sys.exit too): name it, no traceback
        raise SuiteError(f"{where}: the dataset failed to load: {type(exc).__name__}: {exc}") from None
    attack = job.attack.instantiate()
    if (job.dataset.label, job.attack.label) not in checked:
        try:
            attack.check_dataset(splits)
        except BenchError as exc:
            raise SuiteError(f"{where}: {exc}") from None
        except (Exception, SystemExit) as exc:
            raise SuiteError(f"{where}: check_dataset failed: {type(exc).__name__}: {exc}") from None
        checked.add((job.dataset.label, job.attack.label))
    _check_specs(suite, job, splits, (job.attack, job.defense), models, checked, "")
    pool = bonafide_pool_size(splits, job.bonafide_source, attack.withheld_training_images(splits))
    try:
        check_bonafide_size(job.bonafide_size, pool, job.bonafide_source)
    except BenchError as exc:
        raise SuiteError(f"{where}: [suite].{exc}") from None


def _check_specs(suite: Suite, job, splits, specs, models: dict, checked: set, context: str) -> None:
    """Each plugin's `check_model` on the job's untrained model (built once per dataset x model)
    and two blank images, once per model and plugin spec; a refusal names the suite, the model,
    `context` and the plugin."""
    model_id = (job.dataset.label, job.model.label)
    if model_id not in models:
        with torch.random.fork_rng(devices=[]):  # building initialises weights: leave the RNG as it was
            models[model_id] = (build_model(job, splits).eval(), torch.zeros(2, *splits.train.x.shape[1:]))
    for spec in specs:
        if (*model_id, spec.kind, spec.label) in checked:
            continue
        try:
            spec.instantiate().check_model(*models[model_id])
        except BenchError as exc:
            raise SuiteError(
                f"{suite.path}: model '{job.model.label}', {context}{spec.kind} '{spec.label}': {exc}"
            ) from None
        except (Exception, SystemExit) as exc:  # the plugin's own failure, sys.exit() included
            raise SuiteError(
                f"{suite.path}: model '{job.model.label}', {context}{spec.kind} '{spec.label}': check_model "
                f"failed: {type(exc).__name__}: {exc}"
            ) from None
        checked.add((*model_id, spec.kind, spec.label))


def _check_analysis(suite: Suite, job: AnalysisJob, env: JobEnvironment, checked: set, models: dict) -> None:
    where = f"{suite.path}: analysis '{job.analysis.label}', dataset '{job.dataset.label}'"
    try:
        splits = load_dataset(job, env.device)
    except BenchError as exc:
        raise SuiteError(f"{where}: {exc}") from None
    except (Exception, SystemExit) as exc:
        raise SuiteError(f"{where}: the dataset failed to load: {type(exc).__name__}: {exc}") from None
    specs = [job.analysis] + [need.defense for _, need in job.needs]
    specs += [need.attack for _, need in job.needs if need.attack is not None]
    for _, need in job.needs:
        if need.attack is not None and (job.dataset.label, need.attack.label) not in checked:
            try:
                need.attack.instantiate().check_dataset(splits)
            except BenchError as exc:
                raise SuiteError(f"{where}: attack '{need.attack.label}': {exc}") from None
            checked.add((job.dataset.label, need.attack.label))
    _check_specs(suite, job, splits, specs, models, checked, f"analysis '{job.analysis.label}', ")
    for name, need in job.needs:
        if not need.defense.cls.uses_bonafide or need.bonafide_size == 0:
            continue
        try:
            check_bonafide_size(
                need.bonafide_size, bonafide_pool_size(splits, need.bonafide_source, 0), need.bonafide_source
            )
        except BenchError as exc:
            raise SuiteError(f"{where}: model '{name}': {exc}") from None
