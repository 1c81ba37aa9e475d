"""One job, start to end: load data, obtain the attacked model (trained once, then cached),
split off the defender's bonafide set, measure before the defense, apply the defense, measure
after. `run_job` is a function of the job and the artifact cache alone, so any executor (this
process, a pool, a cluster) can run it."""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import numbers
import platform
import signal
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import bench
from bench.attacks import Attack, Metric, Stage
from bench.cache import ArtifactCache
from bench.context import DefenseContext, RunContext
from bench.data import DatasetSplits, ImageData
from bench.defenses import Defended
from bench.errors import BenchError
from bench.evaluation import clean_accuracy, to_model_input
from bench.jobs import Job, content_hash
from bench.metrics import defense_effectiveness_rating
from bench.models import Classifier, InputShape
from bench.registry import Registry
from bench.store import Outcome
from bench.training import train_classifier

CLEAN_ACCURACY = Metric("clean_acc", "C-Acc", higher_is_better=True)
DER = Metric("der", "DER", higher_is_better=True)


@dataclass
class JobEnvironment:
    """What a job runs with besides its spec: the artifact cache, the device and the plugins."""

    cache: ArtifactCache
    device: torch.device
    registry: Registry
    show_progress: bool | None = None


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
                          device=str(env.device), versions=versions(job, env.registry))
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
        before_key = content_hash({"model": model_key(job, job.seed, splits, env.device, env.registry),
                                   "attack": job.attack.config(), "bonafide_source": job.bonafide_source,
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
        device=_device_name(env.device), versions=versions(job, env.registry))


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


def make_context(job: Job, env: JobEnvironment, splits: DatasetSplits, seed: int | None = None) -> RunContext:
    return RunContext(device=env.device, seed=job.seed if seed is None else seed,
                      num_classes=splits.num_classes, eval_batch_size=job.eval_batch_size,
                      horizontal_flip=job.dataset.cls.horizontal_flip, show_progress=env.show_progress)


_loaded_datasets: dict[tuple[str, str], DatasetSplits] = {}


def load_dataset(job: Job, device: torch.device) -> DatasetSplits:
    """The dataset's splits on the device, decoded once per process and kept (two at most)."""
    key = (json.dumps(job.dataset.config(), sort_keys=True), str(device))
    if key not in _loaded_datasets:
        if len(_loaded_datasets) >= 2:
            _loaded_datasets.pop(next(iter(_loaded_datasets)))
        cpu = job.dataset.instantiate().load()
        _loaded_datasets[key] = DatasetSplits(cpu.train.to(device), cpu.test.to(device), cpu.num_classes,
                                              cpu.mean, cpu.std, cpu.source, fingerprint=data_fingerprint(cpu))
    return _loaded_datasets[key]


def data_fingerprint(splits: DatasetSplits) -> str:
    """A hash of every pixel and label, so that cached models follow the data actually read
    (e.g. the JPEG copy versus the official CIFAR-10 files under the same suite)."""
    digest = hashlib.sha256()
    for tensor in (splits.train.x, splits.train.y, splits.test.x, splits.test.y):
        digest.update(tensor.contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:20]


def build_model(job: Job, splits: DatasetSplits) -> nn.Module:
    _, channels, height, width = splits.train.x.shape
    net = job.model.instantiate().build(InputShape(channels, height, width, splits.num_classes))
    return Classifier(net, splits.mean, splits.std)


def model_key(job: Job, seed: int, splits: DatasetSplits, device: torch.device, registry: Registry) -> str:
    """Everything the attacked model depends on: its config, the training seed, the seed of the
    attack's own draws (the job's: a second model for the same job carries the same attack),
    the data read, the kind of device (CUDA trains in bf16), the CPU thread count, and the
    providers' versions."""
    config = {**job.model_config(), "seed": seed}
    if job.attack.cls.stage is not Stage.TEST_TIME:
        config["attack_seed"] = job.seed
    providers = {kind: _provider(registry, kind, getattr(job, kind).name) for kind in ("dataset", "model", "attack")}
    # CPU kernels sum in an order that depends on the thread count, so results do too.
    threads = torch.get_num_threads() if device.type == "cpu" else None
    return content_hash({"config": config, "providers": providers, "bench": bench.__version__,
                         "data": splits.fingerprint, "device": device.type, "cpu_threads": threads})


def attacked_model(job: Job, seed: int, splits: DatasetSplits, env: JobEnvironment) -> tuple[nn.Module, dict, bool]:
    """The model trained (on poisoned data) and tampered with as the job's attack says, for
    `seed`: built once and then read from the cache, by this and every later job."""
    attack: Attack = job.attack.instantiate()
    ctx = make_context(job, env, splits, seed)
    attack_ctx = make_context(job, env, splits)  # the attack draws with the job's seed

    def create() -> dict[str, Any]:
        # Whether this runs (cache miss) or not (hit) must not change what the caller draws next.
        with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):
            ctx.seed_global_rng("model")
            train, state = splits.train, {}
            if attack.stage is Stage.TRAINING:
                train, state = attack.poison(splits.train, attack_ctx)
            model = ctx.prepare(build_model(job, splits))
            losses = train_classifier(model, train, job.recipe, ctx, flip=ctx.horizontal_flip,
                                      desc=f"train {job.model.label} seed={seed}")
            if attack.stage is Stage.POST_TRAINING:
                if seed != job.seed:  # a second model of this job carries the job's own tampering
                    state = {**attacked_model(job, job.seed, splits, env)[1], **state}
                state = attack.tamper(model, splits, attack_ctx, state)
        return {"state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                "attack_state": _to_device(state, "cpu"), "train_losses": losses}

    value, hit = env.cache.get_or_create("models", model_key(job, seed, splits, env.device, env.registry), create)
    model = build_model(job, splits)
    model.load_state_dict(value["state_dict"])
    model = ctx.prepare(model).eval()
    return model, _to_device(value["attack_state"], env.device), hit


def split_bonafide(splits: DatasetSplits, withheld_indices: torch.Tensor | None, source: str,
                   size: int, seed: int) -> tuple[ImageData, ImageData]:
    """(bonafide set for the defender, evaluation set). `test_half`: a seeded half of the test
    set is the defender's pool, the other half is evaluated. `train`: the pool is the training
    images the attack neither altered nor measures itself on, and the whole test set is
    evaluated."""
    generator = torch.Generator().manual_seed(int(hashlib.sha256(f"{seed}:bonafide".encode()).hexdigest()[:15], 16))
    if source == "test_half":
        order = torch.randperm(len(splits.test), generator=generator)
        half = len(order) // 2
        pool, evaluation = order[:half], splits.test.subset(order[half:])
        origin, base = "half of the test set", splits.test
    else:
        candidates = torch.ones(len(splits.train), dtype=torch.bool)
        if withheld_indices is not None:
            candidates[withheld_indices.cpu()] = False
        pool = candidates.nonzero().squeeze(1)[torch.randperm(int(candidates.sum()), generator=generator)]
        evaluation, origin, base = splits.test, "training images the attack left alone", splits.train
    if size > len(pool):
        raise BenchError(f"bonafide_size {size} is more than the {len(pool)} images available "
                         f"({origin}); lower [suite].bonafide_size")
    return base.subset(pool[:size]), evaluation


def versions(job: Job, registry: Registry) -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "robustness-bench": bench.__version__}
    for kind in ("dataset", "model", "attack", "defense"):
        out[f"{kind}:{getattr(job, kind).name}"] = _provider(registry, kind, getattr(job, kind).name)
    return out


def _provider(registry: Registry, kind: str, name: str) -> str:
    info = registry.get(kind, name)
    return f"{info.package} {info.version}".strip()


def _to_device(value: Any, device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
