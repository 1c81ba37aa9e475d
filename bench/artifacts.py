"""Artifacts: what a job builds that outlives it. Datasets on the device (`load_dataset`), the
attacked model (`attacked_model`: trained once under `bench.keys.model_key`, then read from the
`bench.artifact_cache`) and the defended model (`defended_model`); the defender's data is
`bench.bonafide`. The names of those modules are re-exported here for the callers that import
them from `bench.artifacts`."""

from __future__ import annotations

import copy
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import torch
from torch import nn

from bench.attacks import Attack, Stage
from bench.locations import cache_root
from bench.context import DefenseContext, RunContext
from bench.data import DatasetSplits, ImageData
from bench.defenses import DefenderData, Defended
from bench.errors import BenchError
from bench.jobs import AnalysisJob, Job
from bench.artifact_cache import (  # noqa: F401  (re-exported)
    ArtifactCache,
    CacheEntryError,
    cache_dir,
    read_entry,
    remove_stale_temporaries,
    save_arrays_atomically,
    write_entry,
)
from bench.bonafide import (  # noqa: F401  (re-exported)
    BONAFIDE_POOL_ORIGIN,
    bonafide_pool_size,
    bonafide_test_indices,
    check_bonafide_size,
    split_bonafide,
)
from bench.keys import (  # noqa: F401  (re-exported)
    _package_digest,
    code_fingerprint,
    data_fingerprint,
    defended_key,
    machine_fingerprint,
    model_key,
)
from bench.models import Classifier, InputShape
from bench.training import train_classifier


@dataclass
class JobEnvironment:
    """What a job runs with besides its spec: the artifact cache and the device."""

    cache: ArtifactCache
    device: torch.device
    show_progress: bool | None = None
    deterministic: bool = True  # deterministic CUDA kernels (set up by whoever runs the jobs)
    device_policy: str = "auto"  # what the suite asked for (auto, cpu, cuda): remote workers resolve it
    cache_root: Path | None = None  # datasets' cache folder (None: $BENCH_CACHE_DIR or the default)


def make_cuda_deterministic() -> None:
    """Deterministic cuDNN and cuBLAS kernels, so a rerun job reproduces its numbers (for a
    process that only runs jobs, such as a Ray worker; a run in a caller's process uses
    `cuda_determinism`, which restores the settings after)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


@contextmanager
def cuda_determinism(enabled: bool) -> Iterator[None]:
    """`make_cuda_deterministic` within the block, and the caller's settings back after it, so
    a run inside a notebook or another program leaves its kernels as they were."""
    if not enabled:
        yield
        return
    cudnn = torch.backends.cudnn
    saved = (cudnn.deterministic, cudnn.benchmark, torch.are_deterministic_algorithms_enabled())
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    make_cuda_deterministic()
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = saved[0], saved[1]
        torch.use_deterministic_algorithms(saved[2], warn_only=warn_only)
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = workspace


def make_context(job: Job, env: JobEnvironment, splits: DatasetSplits, seed: int | None = None) -> RunContext:
    return RunContext(
        device=env.device,
        seed=job.seed if seed is None else seed,
        num_classes=splits.num_classes,
        eval_batch_size=job.eval_batch_size,
        horizontal_flip=job.dataset.cls.horizontal_flip,
        show_progress=env.show_progress,
        cache_dir=env.cache_root or cache_root(),
    )


_loaded_datasets: dict[tuple[str, str], DatasetSplits] = {}


def load_dataset(job: Job | AnalysisJob, device: torch.device) -> DatasetSplits:
    """The dataset's splits on the device, decoded once per process and kept (two at most)."""
    key = (json.dumps(job.dataset.config(), sort_keys=True), str(device))
    if key not in _loaded_datasets:
        if len(_loaded_datasets) >= 2:
            _loaded_datasets.pop(next(iter(_loaded_datasets)))
        cpu = job.dataset.instantiate().load()
        _loaded_datasets[key] = DatasetSplits(
            cpu.train.to(device),
            cpu.test.to(device),
            cpu.num_classes,
            cpu.mean,
            cpu.std,
            cpu.source,
            fingerprint=data_fingerprint(cpu),
        )
    return _loaded_datasets[key]


def build_model(job: Job | AnalysisJob, splits: DatasetSplits) -> nn.Module:
    _, channels, height, width = splits.train.x.shape
    net = job.model.instantiate().build(InputShape(channels, height, width, splits.num_classes))
    return Classifier(net, splits.mean, splits.std)


class AttackedModel(NamedTuple):
    model: nn.Module
    attack_state: dict
    cache_hit: bool
    train_seconds: float  # what building it took when it was built (stored with the cache entry)


def attacked_model(job: Job, seed: int, splits: DatasetSplits, env: JobEnvironment) -> AttackedModel:
    """The model trained (on poisoned data) and tampered with as the job's attack says, for
    `seed`: built once and then read from the cache, by this and every later job."""
    attack: Attack | None = job.attack.instantiate() if job.attack is not None and job.changes_model else None
    ctx = make_context(job, env, splits, seed)
    attack_ctx = make_context(job, env, splits)  # the attack draws with the job's seed

    def create() -> dict[str, Any]:
        start = time.perf_counter()
        # Whether this runs (cache miss) or not (hit) must not change what the caller draws next.
        with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):
            ctx.seed_global_rng("model")
            train, state = splits.train, dict[str, Any]()
            if attack is not None and attack.stage is Stage.TRAINING:
                train, state = attack.poison(splits.train, attack_ctx)
            model = ctx.prepare(build_model(job, splits))
            batches = None
            if attack is not None and attack.controls_training:
                batches = lambda x, y, g: attack.training_batch(model, x, y, g, attack_ctx, state)  # noqa: E731
            losses = train_classifier(
                model,
                train,
                job.recipe,
                ctx,
                flip=ctx.horizontal_flip,
                desc=f"train {job.model.label} seed={seed}",
                batch_transform=batches,
            )
            if attack is not None and attack.stage is Stage.POST_TRAINING:
                if seed != job.seed:  # a second model of this job carries the job's own tampering
                    state = {**attacked_model(job, job.seed, splits, env).attack_state, **state}
                state = attack.tamper(model, splits, attack_ctx, state)
        return {
            "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
            "attack_state": to_device(state, "cpu"),
            "train_losses": losses,
            "train_seconds": round(time.perf_counter() - start, 4),
        }

    value, hit = env.cache.get_or_create("models", model_key(job, seed, splits, env.device), create)
    model = build_model(job, splits)
    model.load_state_dict(value["state_dict"])
    model = ctx.prepare(model).eval()
    return AttackedModel(model, to_device(value["attack_state"], env.device), hit, value.get("train_seconds", 0.0))


def as_defended(result: Any, defense) -> Defended:
    """A defense's return value as a `Defended`, checked before anything is measured on it: a
    model, and only values the defense's `metrics` declare; otherwise the job fails here, naming
    the defense."""
    if isinstance(result, nn.Module):
        return Defended(result)
    if not isinstance(result, Defended):
        raise BenchError(
            f"{defense.name}: apply() returned a {type(result).__name__}; it must return the defended "
            "torch.nn.Module or a bench.Defended"
        )
    if not isinstance(result.model, nn.Module):
        raise BenchError(
            f"{defense.name}: apply() returned a Defended whose model is a "
            f"{type(result.model).__name__}, not a torch.nn.Module"
        )
    undeclared = sorted(set(result.values) - {m.key for m in defense.metrics})
    if undeclared:
        raise BenchError(f"{defense.name}: reported the value '{undeclared[0]}', which its `metrics` do not declare")
    return result


def _same_structure(model: nn.Module, reference: nn.Module) -> bool:
    return [type(m) for m in model.modules()] == [type(m) for m in reference.modules()] and list(
        model.state_dict()
    ) == list(reference.state_dict())


def defended_model(
    job: Job,
    model: nn.Module,
    bonafide: ImageData,
    splits: DatasetSplits,
    env: JobEnvironment,
    defense_ctx: DefenseContext,
    extra_seconds: Callable[[], float] = lambda: 0.0,
) -> tuple[Defended, float | None]:
    """The job's defense applied to (a copy of) `model`, or read from the cache: a defended model
    with the attacked model's structure (fine-tuning, adversarial training) is stored under
    `defended_key` with its series, values and defense seconds, so a leaderboard job and an
    analysis that need the same defended model build it once. Returns (the result, the stored
    defense seconds on a cache hit, else None). Wrappers (stochastic defenses, masks) and
    defenses that yield points are not cached. `extra_seconds` says what to add to the time
    `apply` took for the cost it does not show (further attacked models read from the cache)."""
    defense = job.defense.instantiate()
    if defense.returns_model_unchanged:
        given, data = defender_inputs(job, defense, model, bonafide, splits, env)
        return as_defended(defense.apply(given, data, defense_ctx), defense), None
    key = defended_key(job, splits, env.device)

    def cached() -> tuple[Defended, float] | None:
        return _cached_defended(job, key, splits, env, defense_ctx)

    hit = cached()
    if hit is not None:
        return hit
    with env.cache.lock("defended", key):  # another process applying the same defense: wait for it
        hit = cached()
        if hit is not None:
            return hit
        start = time.perf_counter()
        given, data = defender_inputs(job, defense, model, bonafide, splits, env)
        result = as_defended(defense.apply(given, data, defense_ctx), defense)
        seconds = time.perf_counter() - start + extra_seconds()
        if result.points is None and _same_structure(result.model, model):
            env.cache.put(
                "defended",
                key,
                {
                    "state_dict": {k: v.cpu() for k, v in result.model.state_dict().items()},
                    "series": result.series,
                    "values": dict(result.values),
                    "seconds": round(seconds, 4),
                    "removed_training_indices": None
                    if result.removed_training_indices is None
                    else result.removed_training_indices.cpu(),
                },
            )
    return result, None


def _cached_defended(job: Job, key: str, splits, env: JobEnvironment, ctx) -> tuple[Defended, float] | None:
    """The defended model stored under `key` and the seconds it took to build, or None."""
    entry = env.cache.get("defended", key)
    if entry is None:
        return None
    restored = build_model(job, splits)
    restored.load_state_dict(entry["state_dict"])
    removed = entry.get("removed_training_indices")
    defended = Defended(
        ctx.prepare(restored).eval(),
        series=entry["series"],
        values=entry["values"],
        removed_training_indices=None if removed is None else removed.to(env.device),
    )
    return defended, entry["seconds"]


def defender_inputs(
    job: Job, defense, model: nn.Module, bonafide: ImageData, splits: DatasetSplits, env: JobEnvironment
) -> tuple[nn.Module, ImageData]:
    """What `defense.apply` gets, as its `defender_data` declares: a copy of the attacked model
    and the bonafide images; a copy and no images (data-free); or a freshly initialised model of
    the architecture and the training set as the attack poisoned it (never which images were)."""
    if defense.defender_data is DefenderData.NONE:
        return copy.deepcopy(model), bonafide.subset(torch.arange(0, device=bonafide.y.device))
    if defense.defender_data is DefenderData.POISONED_TRAINING_SET:
        return untrained_model(job, splits, env), poisoned_training_set(job, splits, env)
    return copy.deepcopy(model), bonafide


def poisoned_training_set(job: Job, splits: DatasetSplits, env: JobEnvironment) -> ImageData:
    """The training set as the job's attack poisoned it for the job's attacked model: the same
    draws (the attack's generators are seeded by the job seed), recomputed, not stored."""
    attack = job.attack.instantiate() if job.attack is not None else None
    if attack is None or attack.stage is not Stage.TRAINING:
        raise BenchError(
            f"defense '{job.defense.label}' trains on the poisoned training set, but attack "
            f"'{job.attack.label if job.attack else None}' poisons no training data"
        )
    ctx = make_context(job, env, splits)
    with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):
        ctx.seed_global_rng("model")
        train, _ = attack.poison(splits.train, ctx)
    return train


def untrained_model(job: Job, splits: DatasetSplits, env: JobEnvironment) -> nn.Module:
    """A freshly initialised model of the job's architecture (seeded by the job seed), on the device."""
    ctx = make_context(job, env, splits)
    with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):
        ctx.seed_global_rng("defender_model")
        return ctx.prepare(build_model(job, splits))


def to_device(value: Any, device) -> Any:
    """Tensors inside dicts, lists and tuples moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value
