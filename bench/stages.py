"""The stages of one job, start to end: load data, obtain the attacked model (trained once,
then cached), split off the defender's bonafide set, measure before the defense, apply the
defense, measure after. `run_job` is a function of the job and the artifact cache alone (the
job carries its resolved plugins), so any executor (this process, a pool, a cluster) can run
it; what it builds and caches is in `bench.artifacts`."""

from __future__ import annotations

import copy
import datetime
import json
import numbers
import platform
import signal
import threading
import time
import traceback
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

import bench
from bench.artifacts import (JobEnvironment, attacked_model, load_dataset, make_context, model_key,
                             split_bonafide)
from bench.attacks import Attack, Metric
from bench.context import DefenseContext, RunContext
from bench.data import ImageData
from bench.defenses import Defended
from bench.errors import BenchError
from bench.evaluation import clean_accuracy, to_model_input
from bench.jobs import Job, Outcome, content_hash
from bench.metrics import defense_effectiveness_rating

CLEAN_ACCURACY = Metric("clean_acc", "C-Acc", higher_is_better=True)
DER = Metric("der", "DER", higher_is_better=True)


_user_interrupt = threading.Event()


@contextmanager
def user_interrupts_marked():
    """While inside, Ctrl-C (SIGINT) sets a flag before raising KeyboardInterrupt, so that a job
    can tell the user's interrupt (stop the run) from a KeyboardInterrupt or SystemExit a
    plugin raised itself (one failed job)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):
        _user_interrupt.set()
        raise KeyboardInterrupt

    _user_interrupt.clear()
    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def execute_job(job: Job, env: JobEnvironment) -> Outcome:
    """Run a job; a failure becomes a failed Outcome with the traceback, never an exception,
    except the user's interrupt, which stops the run. A plugin calling sys.exit() or raising
    KeyboardInterrupt itself fails its job only."""
    started = _now()
    try:
        outcome = run_job(job, env)
        check_storable(outcome)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt) and _user_interrupt.is_set():
            raise
        if not isinstance(exc, (Exception, KeyboardInterrupt, SystemExit)):
            raise  # GeneratorExit and the like belong to the interpreter
        if isinstance(exc, BenchError):  # a message the user can act on; no traceback
            error = f"{type(exc).__name__}: {exc}"
        else:
            exiting = isinstance(exc, (KeyboardInterrupt, SystemExit))
            note = f"a plugin raised {type(exc).__name__} (e.g. called sys.exit()) inside the job\n" if exiting else ""
            error = f"{type(exc).__name__}: {exc}\n{note}{traceback.format_exc()}".strip()
        outcome = Outcome(status="failed", error=error,
                          device=str(env.device), versions=versions(job))
    outcome.started_at, outcome.finished_at = started, _now()
    return outcome


def check_storable(outcome: Outcome) -> None:
    """Metrics must be real numbers and series plain JSON (numbers, strings, lists, dicts), or
    the job fails here, naming the value, instead of the store failing for the whole run."""
    for key, value in outcome.metrics.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise BenchError(f"metric '{key}' is a {type(value).__name__} ({str(value)[:60]!r}); attacks and "
                             "defenses must report plain numbers (e.g. float(tensor))")
        outcome.metrics[key] = float(value)
    try:
        json.dumps(outcome.series)
    except (TypeError, ValueError) as exc:
        raise BenchError(f"a series cannot be stored ({exc}); series hold lists of dicts of plain numbers "
                         "and strings") from None


@torch.no_grad()
def check_finite_outputs(model: nn.Module, images: ImageData, ctx: RunContext, what: str) -> None:
    """Fail the job when `model` gives NaN or infinite logits on a batch of evaluation images:
    argmax would turn them into class 0 and a broken model could rank first."""
    x = to_model_input(images.x[:ctx.eval_batch_size])
    with ctx.autocast():
        logits = model.eval()(x)
    if not torch.isfinite(logits).all():
        bad = int((~torch.isfinite(logits)).any(dim=1).sum())
        raise BenchError(f"{what} gives NaN or infinite outputs on {bad} of {len(x)} evaluation images "
                         "(e.g. diverged training: check lr and the other options)")


def run_job(job: Job, env: JobEnvironment) -> Outcome:
    timings: dict[str, float] = {}

    @contextmanager
    def stage(name: str):
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
        start = time.perf_counter()
        yield
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
        timings[name] = round(time.perf_counter() - start, 4)

    attack: Attack = job.attack.instantiate()
    defense = job.defense.instantiate()
    with stage("data"):
        splits = load_dataset(job, env.device)
    ctx = make_context(job, env, splits)

    with stage("train"):
        model, attack_state, model_hit = attacked_model(job, job.seed, splits, env)
    withheld = [attack_state[k] for k in ("poisoned_indices", "reserved_indices") if k in attack_state]
    bonafide, evaluation = split_bonafide(splits, torch.cat(withheld) if withheld else None,
                                          job.bonafide_source, job.bonafide_size, job.seed)

    check_finite_outputs(model, evaluation, ctx, "the attacked model")

    def measure(predictor: nn.Module) -> dict[str, float]:
        metrics = {"clean_acc": clean_accuracy(predictor, evaluation, ctx)}
        metrics.update(attack.evaluate(predictor, evaluation, ctx, attack_state))
        return metrics

    with stage("evaluate_before"):
        before_key = content_hash({"model": model_key(job, job.seed, splits, env.device),
                                   "attack": job.attack.config(), "bonafide_source": job.bonafide_source.value,
                                   "seed": job.seed, "eval_batch_size": job.eval_batch_size})
        before, before_hit = env.cache.get_or_create("evaluations", before_key, lambda: measure(model))

    endpoint_seconds = []

    def attacked_model_with_seed(seed: int) -> nn.Module:
        # Training another attacked model is shared work, timed apart from the defense itself.
        start = time.perf_counter()
        other = attacked_model(job, seed, splits, env)[0]
        endpoint_seconds.append(time.perf_counter() - start)
        return other

    defense_ctx = DefenseContext(**vars(ctx), recipe=job.recipe, attacked_model_with_seed=attacked_model_with_seed)
    defense_ctx.seed_global_rng("defense")
    given = copy.deepcopy(model)
    with stage("defense"):
        result = as_defended(defense.apply(given, bonafide, defense_ctx), defense)
    defended = result.model
    unchanged = defense.returns_model_unchanged and defended is given
    if not unchanged:
        check_finite_outputs(defended, evaluation, ctx, f"defense '{job.defense.label}': the defended model")
    if endpoint_seconds:
        timings["other_attacked_models"] = round(sum(endpoint_seconds), 4)
        timings["defense"] = round(timings["defense"] - timings["other_attacked_models"], 4)
    with stage("evaluate"):
        # Attacking the same model again would repeat the before-defense numbers exactly.
        after = dict(before) if unchanged else measure(defended)
    series = {name: list(records) for name, records in result.series.items()}
    if result.points is not None:
        with stage("evaluate_points"):
            for name, coordinates, point_model in result.points():
                series.setdefault(name, []).append({**coordinates, **measure(point_model)})

    metrics = dict(after)
    metrics.update({f"{k}_before": v for k, v in before.items()})
    info = {"clean_acc": CLEAN_ACCURACY.info()}
    info.update({m.key: m.info() for m in attack.metrics})
    success = attack.success_metric
    if success and success in after and success in before:
        metrics["der"] = defense_effectiveness_rating(before[success], after[success],
                                                      before["clean_acc"], after["clean_acc"])
        info["der"] = DER.info()
    declared = {m.key: m for m in defense.metrics}
    for key, value in result.values.items():
        metrics[key] = float(value)
        info[key] = declared[key].info()
    return Outcome(
        status="ok", metrics=metrics, metric_info=info, timings=timings,
        series=series,
        notes={"model_cache": "hit" if model_hit else "miss", "evaluation_cache": "hit" if before_hit else "miss",
               "data_source": splits.source, "bonafide_images": len(bonafide), "evaluation_images": len(evaluation),
               "attack_protocol": attack.describe_protocol()},
        device=_device_name(env.device), versions=versions(job))


def as_defended(result: Any, defense) -> Defended:
    """A defense's return value as a `Defended`, checked before anything is measured on it: a
    model, and only values the defense's `metrics` declare; otherwise the job fails here, naming
    the defense."""
    if isinstance(result, nn.Module):
        return Defended(result)
    if not isinstance(result, Defended):
        raise BenchError(f"{defense.name}: apply() returned a {type(result).__name__}; it must return the defended "
                         "torch.nn.Module or a bench.Defended")
    if not isinstance(result.model, nn.Module):
        raise BenchError(f"{defense.name}: apply() returned a Defended whose model is a "
                         f"{type(result.model).__name__}, not a torch.nn.Module")
    undeclared = sorted(set(result.values) - {m.key for m in defense.metrics})
    if undeclared:
        raise BenchError(f"{defense.name}: reported the value '{undeclared[0]}', which its `metrics` do not declare")
    return result








def versions(job: Job) -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "robustness-bench": bench.__version__}
    for kind in ("dataset", "model", "attack", "defense"):
        spec = getattr(job, kind)
        out[f"{kind}:{spec.name}"] = spec.provider
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
