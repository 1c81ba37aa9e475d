"""The stages of one job, start to end: load data, obtain the attacked model (trained once,
then cached), split off the defender's bonafide set, measure before the defense, apply the
defense, measure after. `run_job` is a function of the job and the artifact cache alone (the
job carries its resolved plugins), so any executor (this process, a pool, a cluster) can run
it; what it builds and caches is in `bench.artifacts`."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import numbers
import os
import platform
import signal
import threading
import time
import traceback
from typing import Any, Callable
from contextlib import contextmanager

import torch
from torch import nn

import bench
from bench.artifacts import JobEnvironment, attacked_model, defended_model, load_dataset, make_context
from bench.bonafide import bonafide_pool_size, bonafide_test_indices, split_bonafide
from bench.keys import code_fingerprint, model_key
from bench.attacks import Attack, Metric
from bench.analyses import AnalysisData, AnalysisResult
from bench.context import DefenseContext, RunContext
from bench.data import ImageData
from bench.errors import BenchError
from bench.evaluation import clean_accuracy, to_model_input
from bench.jobs import ATTACK_TRAINING_NOTE, AnalysisJob, BonafideSource, Job, Outcome, content_hash
from bench.locations import cache_root, using_cache_root
from bench.metrics import defense_effectiveness_rating

CLEAN_ACCURACY = Metric("clean_acc", "C-Acc", higher_is_better=True, doc="clean accuracy")
DER = Metric(
    "der",
    "DER",
    higher_is_better=True,
    doc="defense effectiveness rating (BackdoorBench: (max(0, ASR drop) − max(0, C-Acc drop) + 1) / 2)",
    headline=True,
)
# A filtering defense's removed training images against the attack's poisoned ones.
DETECTION_METRICS = (
    Metric(
        "detection_tpr", "Detection TPR", True, diagnostic=True, doc="share of the poisoned training images removed"
    ),
    Metric("detection_fpr", "Detection FPR", False, diagnostic=True, doc="share of the clean training images removed"),
    Metric(
        "detection_precision",
        "Detection precision",
        True,
        diagnostic=True,
        doc="share of the removed training images that were poisoned",
    ),
)


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


def execute_job(job: Job | AnalysisJob, env: JobEnvironment) -> Outcome:
    """Run a job; a failure becomes a failed Outcome with the traceback, never an exception,
    except the user's interrupt, which stops the run. A plugin calling sys.exit() or raising
    KeyboardInterrupt itself fails its job only."""
    started = _now()
    try:
        with using_cache_root(env.cache_root):
            outcome = RUNNERS[job.table](job, env)
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
        outcome = Outcome(status="failed", error=error, device=str(env.device), versions=versions(job))
    outcome.started_at, outcome.finished_at = started, _now()
    return outcome


def check_storable(outcome: Outcome) -> None:
    """Metrics must be real numbers and series plain JSON (numbers, strings, lists, dicts), or
    the job fails here, naming the value, instead of the store failing for the whole run."""
    for key, value in outcome.metrics.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise BenchError(
                f"metric '{key}' is a {type(value).__name__} ({str(value)[:60]!r}); attacks and "
                "defenses must report plain numbers (e.g. float(tensor))"
            )
        outcome.metrics[key] = float(value)
    try:
        json.dumps(outcome.series)
    except (TypeError, ValueError) as exc:
        raise BenchError(
            f"a series cannot be stored ({exc}); series hold lists of dicts of plain numbers and strings"
        ) from None


@torch.no_grad()
def check_finite_outputs(model: nn.Module, images: ImageData, ctx: RunContext, what: str) -> None:
    """Fail the job when `model` gives NaN or infinite logits on a batch of evaluation images:
    argmax would turn them into class 0 and a broken model could rank first."""
    x = to_model_input(images.x[: ctx.eval_batch_size])
    with ctx.autocast():
        logits = model.eval()(x)
    if not torch.isfinite(logits).all():
        bad = int((~torch.isfinite(logits)).any(dim=1).sum())
        raise BenchError(
            f"{what} gives NaN or infinite outputs on {bad} of {len(x)} evaluation images "
            "(e.g. diverged training: check lr and the other options)"
        )


@contextmanager
def finite_outputs_checked(model: nn.Module, what: str):
    """Check every output `model` gives inside the block (clean, triggered, adversarial, any
    forward call an attack makes): a forward hook counts non-finite rows on the device, read
    once at the end, so no batch waits for the host. Raises `BenchError` when any is NaN or
    infinite: argmax would turn them into class 0 and rank a broken model."""
    counts = {"bad": None, "rows": 0}

    def hook(module, inputs, output):
        if isinstance(output, torch.Tensor) and output.dim() >= 1:
            bad = (~torch.isfinite(output.detach())).reshape(len(output), -1).any(dim=1).sum()
            counts["bad"] = bad if counts["bad"] is None else counts["bad"] + bad
            counts["rows"] += len(output)

    handle = model.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
    if counts["bad"] is not None and int(counts["bad"]) > 0:
        raise BenchError(
            f"{what} gives NaN or infinite outputs on {int(counts['bad'])} of the {counts['rows']} predictions "
            "made while measuring it (clean, triggered or adversarial images)"
        )


def check_finite_metrics(metrics: dict[str, float], where: str) -> None:
    """A metric must be a finite number: inf would rank first and NaN would become a blank cell."""
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue  # not a number at all: the store's own check names it
        if not math.isfinite(number):
            raise BenchError(f"{where} reported the metric '{key}' = {value}; metrics must be finite numbers")


@contextmanager
def timed(timings: dict[str, float], env: JobEnvironment, name: str):
    """Record the block's wall time under `name` (CUDA work finished at both ends)."""
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)
    start = time.perf_counter()
    yield
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)
    timings[name] = round(time.perf_counter() - start, 4)


class FurtherModels:
    """`attacked_model_with_seed` for a defense, keeping the books: a further attacked model (MCR's
    second endpoint) is part of the defense's cost, so what training it took is charged to the
    defense however long reading it back from the cache took now."""

    def __init__(self, job: Job, splits, env: JobEnvironment):
        self.job, self.splits, self.env = job, splits, env
        self.fetch_seconds: list[float] = []
        self.train_seconds: list[float] = []

    def __call__(self, seed: int) -> nn.Module:
        start = time.perf_counter()
        other = attacked_model(self.job, seed, self.splits, self.env)
        self.fetch_seconds.append(time.perf_counter() - start)
        self.train_seconds.append(other.train_seconds)
        return other.model

    def extra_seconds(self) -> float:
        """What to add to the time the defense took: their training, less reading them back."""
        return sum(self.train_seconds) - sum(self.fetch_seconds)


def run_job(job: Job, env: JobEnvironment) -> Outcome:
    timings: dict[str, float] = {}
    assert job.attack is not None  # a suite's jobs always have an attack
    attack: Attack = job.attack.instantiate()
    defense = job.defense.instantiate()
    with timed(timings, env, "data"):
        splits = load_dataset(job, env.device)
    ctx = make_context(job, env, splits)
    with timed(timings, env, "train"):
        model, attack_state, model_hit, model_seconds = attacked_model(job, job.seed, splits, env)
    withheld = [attack_state[k] for k in ("poisoned_indices", "reserved_indices") if k in attack_state]
    bonafide, evaluation = split_bonafide(
        splits, torch.cat(withheld) if withheld else None, job.bonafide_source, job.bonafide_size, job.seed
    )
    check_finite_outputs(model, evaluation, ctx, "the attacked model")
    attack_label = job.attack.label

    def measure(predictor: nn.Module, what: str) -> dict[str, float]:
        with finite_outputs_checked(predictor, what):
            metrics = {"clean_acc": clean_accuracy(predictor, evaluation, ctx)}
            metrics.update(attack.evaluate(predictor, evaluation, ctx, attack_state))
        check_finite_metrics(metrics, f"attack '{attack_label}'")
        return metrics

    with timed(timings, env, "evaluate_before"):
        before, before_hit = env.cache.get_or_create(
            "evaluations", _evaluation_key(job, splits, env), lambda: measure(model, "the attacked model")
        )
    further = FurtherModels(job, splits, env)
    result, unchanged, cached_seconds = _defend(job, defense, model, bonafide, splits, env, ctx, further, timings)
    defended = result.model
    what = f"defense '{job.defense.label}': the defended model"
    if not unchanged:
        check_finite_outputs(defended, evaluation, ctx, what)
    with timed(timings, env, "evaluate"):
        # Attacking the same model again would repeat the before-defense numbers exactly.
        after = dict(before) if unchanged else measure(defended, what)
    series = {name: list(records) for name, records in result.series.items()}
    if result.points is not None:
        with timed(timings, env, "evaluate_points"):
            for name, coordinates, point_model in result.points():
                measured = measure(point_model, f"defense '{job.defense.label}': the model at {coordinates}")
                series.setdefault(name, []).append({**coordinates, **measured})
    metrics, info = _job_metrics(job, attack, defense, before, after, result.values)
    _add_detection_rates(metrics, info, result, attack_state, splits)
    caches = {"model_cache": model_hit, "evaluation_cache": before_hit}
    caches["defended_model_cache"] = cached_seconds is not None
    sizes = (len(bonafide), len(evaluation))
    notes = _job_notes(job, attack, defense, splits, env, caches, sizes, further, model_seconds)
    return Outcome(
        status="ok",
        metrics=metrics,
        metric_info=info,
        timings=timings,
        series=series,
        notes=notes,
        device=_device_name(env.device),
        versions=versions(job),
    )


def _defend(job: Job, defense, model, bonafide, splits, env: JobEnvironment, ctx, further, timings):
    """The defended model (from the cache when it was built before), whether it is the attacked
    model untouched, and the seconds a cached one took to build (None when built now). The
    defense's time is its whole cost: further attacked models it trained count too."""
    defense_ctx = DefenseContext(**vars(ctx), recipe=job.recipe, attacked_model_with_seed=further)
    defense_ctx.seed_global_rng("defense")
    with timed(timings, env, "defense"):
        result, cached_seconds = defended_model(job, model, bonafide, splits, env, defense_ctx, further.extra_seconds)
    defended = result.model
    unchanged = defense.returns_model_unchanged and isinstance(defended, type(model)) and _same_weights(defended, model)
    if cached_seconds is not None:  # the time it took to build, not to read it back
        timings["defense"] = cached_seconds
    elif further.train_seconds:
        timings["defense"] = round(timings["defense"] + further.extra_seconds(), 4)
    return result, unchanged, cached_seconds


def _add_detection_rates(metrics: dict, info: dict, result, attack_state: dict, splits) -> None:
    """For a filtering defense, its detection rates against the attack's poisoned images."""
    if result.removed_training_indices is not None and "poisoned_indices" in attack_state:
        metrics.update(detection_rates(result.removed_training_indices, attack_state["poisoned_indices"], splits))
        info.update({m.key: m.info() for m in DETECTION_METRICS if m.key in metrics})


def detection_rates(removed: torch.Tensor, poisoned: torch.Tensor, splits) -> dict[str, float]:
    """TPR, FPR and precision of the removed training images against the poisoned ones; a rate
    with nothing to divide by (no poisoned image, nothing removed) is left out, not NaN."""
    total = len(splits.train)
    is_removed = torch.zeros(total, dtype=torch.bool)
    is_removed[removed.cpu().long()] = True
    is_poisoned = torch.zeros(total, dtype=torch.bool)
    is_poisoned[poisoned.cpu().long()] = True
    hits = (is_removed & is_poisoned).sum().item()
    clean = total - int(is_poisoned.sum())

    rates = {
        "detection_tpr": (hits, int(is_poisoned.sum())),
        "detection_fpr": (int(is_removed.sum()) - hits, clean),
        "detection_precision": (hits, int(is_removed.sum())),
    }
    return {key: part / whole for key, (part, whole) in rates.items() if whole}


def _job_notes(
    job: Job, attack, defense, splits, env, caches: dict[str, bool], sizes: tuple[int, int], further, model_seconds
) -> dict[str, Any]:
    """What the store keeps beside a job's numbers: cache hits, data, machine, protocol, methods."""
    return {
        **{key: "hit" if hit else "miss" for key, hit in caches.items()},
        "data_source": splits.source,
        "machine": machine_description(env.device),
        "bonafide_images": sizes[0],
        "evaluation_images": sizes[1],
        ATTACK_TRAINING_NOTE: round(model_seconds, 4),  # the attack's cost, stored with the model
        "attack_protocol": attack.describe_protocol(),
        "extra_models_trained": len(defense.other_attacked_seeds(job.seed)),
        "defender_data": defense.defender_data.value,
        # part of the defense's time (its whole cost), so not a stage of its own
        "extra_models_train_seconds": round(sum(further.train_seconds), 4),
        "methods": method_links(job.attack, job.defense),
    }


def _evaluation_key(job: Job, splits, env: JobEnvironment) -> str:
    """Everything the attacked model's pre-defense metrics depend on."""
    assert job.attack is not None
    return content_hash(
        {
            "model": model_key(job, job.seed, splits, env.device),
            "attack": job.attack.config(),
            "attack_code": code_fingerprint(job.attack.cls),
            "bonafide_source": job.bonafide_source.value,
            "seed": job.seed,
            "eval_batch_size": job.eval_batch_size,
        }
    )


def _job_metrics(job: Job, attack: Attack, defense, before: dict, after: dict, values: dict) -> tuple[dict, dict]:
    """(metrics, their descriptions): after the defense, `*_before`, DER from the attack's
    success metric, and the defense's own values."""
    metrics = dict(after)
    metrics.update({f"{k}_before": v for k, v in before.items()})
    info = {"clean_acc": CLEAN_ACCURACY.info()}
    info.update({m.key: m.info() for m in attack.metrics})
    success = attack.success_metric
    if success and success in after and success in before:
        metrics["der"] = defense_effectiveness_rating(
            before[success], after[success], before["clean_acc"], after["clean_acc"]
        )
        info["der"] = DER.info()
    declared = {m.key: m for m in defense.metrics}
    check_finite_metrics(values, f"defense '{job.defense.label}'")
    for key, value in values.items():
        metrics[key] = float(value)
        info[key] = declared[key].info()
    return metrics, info


def _same_weights(model: nn.Module, other: nn.Module) -> bool:
    """Whether a defense that declares `returns_model_unchanged` did return the model as given."""
    mine, theirs = model.state_dict(), other.state_dict()
    return list(mine) == list(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)


def run_analysis(job: AnalysisJob, env: JobEnvironment) -> Outcome:
    """Build (or read from the cache) the models the analysis asked for, then run it."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    splits = load_dataset(job, env.device)
    timings["data"] = round(time.perf_counter() - start, 4)
    notes: dict[str, Any] = {}
    start = time.perf_counter()
    models, evaluation = _analysis_models(job, splits, env, notes)
    timings["models"] = round(time.perf_counter() - start, 4)

    analysis = job.analysis.instantiate()
    ctx = RunContext(
        device=env.device,
        seed=job.seed,
        num_classes=splits.num_classes,
        eval_batch_size=job.eval_batch_size,
        horizontal_flip=job.dataset.cls.horizontal_flip,
        show_progress=env.show_progress,
        cache_dir=env.cache_root or cache_root(),
    )
    ctx.seed_global_rng("analysis")
    start = time.perf_counter()
    result = analysis.run(models, AnalysisData(splits, evaluation), ctx)
    timings["analysis"] = round(time.perf_counter() - start, 4)
    if not isinstance(result, AnalysisResult):
        raise BenchError(f"{analysis.name}: run() returned a {type(result).__name__}, not a bench.AnalysisResult")
    declared = _checked_analysis_result(analysis, result, job)
    notes.update(
        {
            "figures": [f.info() for f in result.figures],
            "findings": [f.info() for f in result.findings],
            "data_source": splits.source,
            "machine": machine_description(env.device),
            "evaluation_images": len(evaluation),
            "methods": method_links(job.analysis),
        }
    )
    return Outcome(
        status="ok",
        metrics={k: float(v) for k, v in result.values.items()},
        metric_info={k: declared[k].info() for k in result.values},
        timings=timings,
        series={name: list(records) for name, records in result.series.items()},
        notes=notes,
        device=_device_name(env.device),
        versions=versions(job),
    )


def _analysis_models(job: AnalysisJob, splits, env: JobEnvironment, notes: dict[str, Any]):
    """The models the analysis asked for, attacked and defended through the jobs' cache (cache
    hits noted in `notes`), and the test images none of their defenders was given."""
    models: dict[str, nn.Module] = {}
    unseen = torch.ones(len(splits.test), dtype=torch.bool)  # test images no defender was given
    needs = []
    for name, need in job.needs:
        if need.defense.cls.uses_bonafide and need.bonafide_size == 0:  # all the pool has
            need = dataclasses.replace(need, bonafide_size=bonafide_pool_size(splits, need.bonafide_source, 0))
        if need.defense.cls.uses_bonafide and need.bonafide_source is BonafideSource.TEST_HALF:
            unseen[bonafide_test_indices(splits, need.bonafide_size, job.seed + need.seed_offset)] = False
        needs.append((name, need))
    evaluation = splits.test.subset(unseen.nonzero().squeeze(1))
    for name, need in needs:
        model_job = job.model_job(need)
        model, attack_state, hit, _ = attacked_model(model_job, model_job.seed, splits, env)
        withheld = [attack_state[k] for k in ("poisoned_indices", "reserved_indices") if k in attack_state]
        notes[f"{name}_model_cache"] = "hit" if hit else "miss"
        if not need.defense.cls.returns_model_unchanged:
            bonafide, _ = split_bonafide(
                splits,
                torch.cat(withheld) if withheld else None,
                need.bonafide_source,
                model_job.bonafide_size,
                model_job.seed,
            )
            ctx = make_context(model_job, env, splits)
            further = FurtherModels(model_job, splits, env)
            defense_ctx = DefenseContext(**vars(ctx), recipe=model_job.recipe, attacked_model_with_seed=further)
            defense_ctx.seed_global_rng("defense")
            result, cached_seconds = defended_model(
                model_job, model, bonafide, splits, env, defense_ctx, further.extra_seconds
            )
            model = result.model
            notes[f"{name}_defense_cache"] = "hit" if cached_seconds is not None else "miss"
        check_finite_outputs(model, evaluation, make_context(model_job, env, splits), f"model '{name}'")
        models[name] = model.eval()
    return models, evaluation


def _checked_analysis_result(analysis, result, job: AnalysisJob) -> dict[str, Metric]:
    """The analysis's declared metrics by key, once its result is checked against them."""
    declared = {m.key: m for m in analysis.metrics}
    undeclared = sorted(set(result.values) - set(declared))
    if undeclared:
        raise BenchError(f"{analysis.name}: reported the value '{undeclared[0]}', which its `metrics` do not declare")
    check_finite_metrics(result.values, f"analysis '{job.analysis.label}'")
    for figure in result.figures:
        if figure.series not in result.series:
            raise BenchError(f"{analysis.name}: a figure draws the series '{figure.series}', which it did not return")
    return declared


def versions(job: Job | AnalysisJob) -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "robustness-bench": bench.__version__}
    for kind in job.plugin_kinds:
        spec = getattr(job, kind)
        if spec is not None:
            out[f"{kind}:{spec.name}"] = spec.provider
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def method_links(*specs) -> dict[str, dict]:
    """kind -> {name, paper, code} of each plugin that made a result, stored with it so that the
    report links the methods without importing any plugin."""
    return {
        spec.kind: {"name": spec.name, "paper": spec.cls.paper or "", "code": spec.cls.code or ""}
        for spec in specs
        if spec is not None
    }


def machine_description(device: torch.device) -> str:
    """The machine a result was computed on, as the leaderboard header shows it: the CPU's model
    name and the kernels torch uses on it, or the GPU with its CUDA and cuDNN versions."""
    if device.type == "cuda":
        return (
            f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
        )
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            name = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), name)
    except OSError:
        pass
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return f"{name}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}" + (
        f", oneDNN ISA cap {isa}" if isa else ""
    )


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# How each job kind runs, by the store table its results go to (the job protocol's `table`).
RUNNERS: dict[str, Callable[..., Outcome]] = {"results": run_job, "analyses": run_analysis}
