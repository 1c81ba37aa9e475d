"""Artifacts: everything a job builds that outlives it, and where it is kept.

- The cache root (`cache_root`, `cache_dir`: $BENCH_CACHE_DIR, else ~/.cache/robustness-bench)
  and one atomic-write helper that every file written there goes through.
- `ArtifactCache`, a content-addressed cache of expensive artifacts (trained and attacked
  models, their pre-defense metrics); a key is a hash of everything the artifact depends on.
  Each entry is checked before it is trusted: it is read with `torch.load(weights_only=True)`
  (tensors and plain values only, so a planted pickle cannot run code), and it records the kind
  and key it was made for and a SHA-256 of its payload. A damaged entry (flipped bytes, a file
  copied over another key, a foreign structure) is reported, evicted and rebuilt.
- Datasets on the device (`load_dataset`, with the pixel fingerprint that model keys use),
  the attacked model (`model_key`, `attacked_model`: trained once, then read from the cache)
  and the defender's bonafide pool (`split_bonafide`, shared with the preflight checks).
"""

from __future__ import annotations

import copy
import errno
import functools
import hashlib
import importlib.util
import io
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import filelock
import torch
from torch import nn

import bench
from bench.attacks import Attack, Stage
from bench.context import DefenseContext, RunContext
from bench.data import DatasetSplits, ImageData
from bench.defenses import Defended
from bench.errors import BenchError
from bench.jobs import AnalysisJob, BonafideSource, Job, content_hash
from bench.locations import cache_root, no_space_message, record_written, write_atomically
from bench.models import Classifier, InputShape
from bench.training import train_classifier


def cache_dir() -> Path:
    """Where decoded datasets are cached (`cache_root()`), created if needed."""
    path = cache_root()
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_arrays_atomically(path: Path, arrays: dict) -> None:
    """Write numpy arrays to `path` (.npz) atomically (`write_atomically`)."""
    import numpy as np

    write_atomically(path, lambda handle: np.savez(handle, **arrays))
    record_written(path)


FORMAT = 1
STALE_TEMPORARY_SECONDS = 3600  # a writer still busy after an hour is taken for dead


class CacheEntryError(Exception):
    """A cache entry that cannot be trusted."""


class ArtifactCache:
    def __init__(self, root: str | Path, report: Callable[[str], None] | None = None):
        self.root = Path(root)
        self.report = report or (lambda message: print(message, file=sys.stderr))

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / f"{key}.pt"

    def get_or_create(self, kind: str, key: str, create: Callable[[], Any]) -> tuple[Any, bool]:
        """The cached value under (kind, key), or `create()` stored there. Returns (value, hit).
        The value must be made of tensors and plain Python values (dicts, lists, numbers,
        strings), as `torch.load(weights_only=True)` accepts."""
        value = self.get(kind, key)
        if value is not None:
            return value, True
        with self.lock(kind, key):  # another process may be building it: wait, then read its entry
            value = self.get(kind, key)
            if value is not None:
                return value, True
            value = create()
            self.put(kind, key, value)
        return value, False

    def lock(self, kind: str, key: str) -> filelock.FileLock:
        """An inter-process lock for one entry (a `.lock` file beside it): whoever holds it builds
        the entry; the others wait and then read it, so an artifact is built once."""
        path = self.path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        return filelock.FileLock(path.with_suffix(".lock"))

    def get(self, kind: str, key: str) -> Any | None:
        """The checked value under (kind, key), or None (a damaged entry is reported and evicted)."""
        path = self.path(kind, key)
        if path.is_file():
            try:
                return read_entry(path, kind, key)
            except CacheEntryError as exc:
                self.report(f"cache: {path}: {exc}; rebuilding it")
                path.unlink(missing_ok=True)
        return None

    def put(self, kind: str, key: str, value: Any) -> None:
        path = self.path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        record_written(self.root)
        remove_stale_temporaries(path.parent)
        write_entry(path, kind, key, value)


def write_entry(path: Path, kind: str, key: str, value: Any) -> None:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    payload = buffer.getvalue()
    entry = {
        "format": FORMAT,
        "kind": kind,
        "key": key,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8),
    }
    try:
        write_atomically(path, lambda handle: torch.save(entry, handle), fsync=True)
    except (OSError, RuntimeError) as exc:
        # torch.save reports a full disk as "[enforce fail at inline_container.cc] unexpected pos"
        if isinstance(exc, OSError) and exc.errno != errno.ENOSPC:
            raise
        if isinstance(exc, RuntimeError) and not _disk_nearly_full(path.parent, len(payload)):
            raise
        raise BenchError(no_space_message(path, f"writing the cache entry ({len(payload) / 1e6:.1f} MB)")) from None


def _disk_nearly_full(folder: Path, needed: int) -> bool:
    try:
        return shutil.disk_usage(folder).free < 2 * needed + 1_000_000
    except OSError:
        return False


def read_entry(path: Path, kind: str, key: str) -> Any:
    """The payload of a checked entry; raises `CacheEntryError` saying what is wrong."""
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, truncated, or holding objects beyond plain data
        raise CacheEntryError(f"unreadable or not plain data ({type(exc).__name__})") from None
    if (
        not isinstance(entry, dict)
        or entry.get("format") != FORMAT
        or not isinstance(entry.get("payload"), torch.Tensor)
    ):
        raise CacheEntryError("not a robustness-bench cache entry of this version")
    if entry.get("kind") != kind or entry.get("key") != key:
        raise CacheEntryError(f"made for {entry.get('kind')}/{entry.get('key')}, not for this key")
    payload = entry["payload"].numpy().tobytes()
    if hashlib.sha256(payload).hexdigest() != entry.get("sha256"):
        raise CacheEntryError("checksum mismatch (the file was damaged or changed)")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CacheEntryError(f"payload unreadable ({type(exc).__name__})") from None


def remove_stale_temporaries(folder: Path) -> None:
    """Delete temporary files that writers killed mid-write left behind."""
    now = time.time()
    for tmp in folder.glob("*.tmp"):
        try:
            if now - tmp.stat().st_mtime > STALE_TEMPORARY_SECONDS:
                tmp.unlink()
        except OSError:
            pass  # another process removed or renamed it meanwhile


@dataclass
class JobEnvironment:
    """What a job runs with besides its spec: the artifact cache and the device."""

    cache: ArtifactCache
    device: torch.device
    show_progress: bool | None = None
    deterministic: bool = True  # deterministic CUDA kernels (set up by whoever runs the jobs)
    device_policy: str = "auto"  # what the suite asked for (auto, cpu, cuda): remote workers resolve it


def make_cuda_deterministic() -> None:
    """Deterministic cuDNN and cuBLAS kernels, so a rerun job reproduces its numbers."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def make_context(job: Job, env: JobEnvironment, splits: DatasetSplits, seed: int | None = None) -> RunContext:
    return RunContext(
        device=env.device,
        seed=job.seed if seed is None else seed,
        num_classes=splits.num_classes,
        eval_batch_size=job.eval_batch_size,
        horizontal_flip=job.dataset.cls.horizontal_flip,
        show_progress=env.show_progress,
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


def data_fingerprint(splits: DatasetSplits) -> str:
    """A hash of every pixel and label, so that cached models follow the data actually read
    (e.g. the JPEG copy versus the official CIFAR-10 files under the same suite)."""
    digest = hashlib.sha256()
    for tensor in (splits.train.x, splits.train.y, splits.test.x, splits.test.y):
        digest.update(tensor.contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:20]


def build_model(job: Job | AnalysisJob, splits: DatasetSplits) -> nn.Module:
    _, channels, height, width = splits.train.x.shape
    net = job.model.instantiate().build(InputShape(channels, height, width, splits.num_classes))
    return Classifier(net, splits.mean, splits.std)


def model_key(job: Job, seed: int, splits: DatasetSplits, device: torch.device) -> str:
    """Everything the attacked model depends on: its config, the training seed, the seed of the
    attack's own draws (the job's: a second model for the same job carries the same attack),
    the data read, the kind of device (CUDA trains in bf16), the CPU thread count, and the
    providers' versions."""
    config = {**job.model_config(), "seed": seed}
    kinds: tuple[str, ...] = ("dataset", "model")
    if job.changes_model:
        config["attack_seed"] = job.seed
        kinds += ("attack",)
    providers = {kind: getattr(job, kind).provider for kind in kinds}
    return content_hash(
        {
            "config": config,
            "providers": providers,
            "bench": bench.__version__,
            "code": code_fingerprint(*(getattr(job, kind).cls for kind in kinds)),
            "data": splits.fingerprint,
            "machine": machine_fingerprint(device),
        }
    )


@functools.lru_cache(maxsize=None)
def _package_digest(package: str) -> str:
    """A digest of every Python file of a top-level package (or of a single module), read once
    per process: an editable install changes it with any edit, a version bump or not."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        return "missing"
    roots = [Path(p) for p in (spec.submodule_search_locations or [])]
    files = sorted(f for root in roots for f in root.rglob("*.py")) if roots else [Path(spec.origin or "")]
    digest = hashlib.sha256()
    for file in files:
        try:
            digest.update(file.name.encode() + b"\0" + file.read_bytes())
        except OSError:
            digest.update(file.name.encode() + b"\0unreadable")
    return digest.hexdigest()


def code_fingerprint(*classes: type) -> str:
    """What the code that makes an artifact looks like: the core's files and those of every
    package a plugin class comes from (helpers it imports from its own package included)."""
    packages = sorted({"bench"} | {cls.__module__.split(".")[0] for cls in classes})
    return content_hash({package: _package_digest(package) for package in packages})


def machine_fingerprint(device: torch.device) -> dict:
    """What of the machine a result depends on: torch's version and, on the CPU, the kernels
    torch picks (its CPU capability, oneDNN's ISA cap) and the thread count (sums run in an
    order that depends on it); on CUDA the GPU, CUDA and cuDNN."""
    out: dict[str, Any] = {"device": device.type, "torch": torch.__version__}
    if device.type == "cpu":
        out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        out["onednn_max_cpu_isa"] = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
        out["cpu_threads"] = torch.get_num_threads()
    elif device.type == "cuda":
        out["cuda"] = torch.version.cuda
        if torch.cuda.is_available():  # a key asked for on a machine without the GPU still differs from a CPU key
            out["gpu"] = torch.cuda.get_device_name(device)
            out["cudnn"] = torch.backends.cudnn.version()
    return out


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
            losses = train_classifier(
                model, train, job.recipe, ctx, flip=ctx.horizontal_flip, desc=f"train {job.model.label} seed={seed}"
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


def defended_key(job: Job, splits: DatasetSplits, device: torch.device) -> str:
    """Everything a defended model depends on: the attacked model, the defense and its provider,
    and the defender's bonafide data (size, source, and the seed that draws it)."""
    return content_hash(
        {
            "model": model_key(job, job.seed, splits, device),
            "defense": job.defense.config(),
            "provider": job.defense.provider,
            "code": code_fingerprint(job.defense.cls),
            "bonafide_size": job.bonafide_size,
            "bonafide_source": job.bonafide_source.value,
            "seed": job.seed,
        }
    )


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
        return as_defended(defense.apply(copy.deepcopy(model), bonafide, defense_ctx), defense), None
    key = defended_key(job, splits, env.device)

    def cached() -> tuple[Defended, float] | None:
        entry = env.cache.get("defended", key)
        if entry is None:
            return None
        restored = build_model(job, splits)
        restored.load_state_dict(entry["state_dict"])
        return Defended(defense_ctx.prepare(restored).eval(), series=entry["series"], values=entry["values"]), entry[
            "seconds"
        ]

    hit = cached()
    if hit is not None:
        return hit
    with env.cache.lock("defended", key):  # another process applying the same defense: wait for it
        hit = cached()
        if hit is not None:
            return hit
        start = time.perf_counter()
        result = as_defended(defense.apply(copy.deepcopy(model), bonafide, defense_ctx), defense)
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
                },
            )
    return result, None


BONAFIDE_POOL_ORIGIN = {
    BonafideSource.TEST_HALF: "half of the test set",
    BonafideSource.TRAIN: "training images the attack left alone",
}


def bonafide_pool_size(splits: DatasetSplits, source: BonafideSource, withheld: int) -> int:
    """How many images the defender's pool has, `withheld` training images being the attack's
    (poisoned or measured): what `split_bonafide` draws from, known before any training."""
    return len(splits.test) // 2 if source is BonafideSource.TEST_HALF else len(splits.train) - withheld


def check_bonafide_size(size: int, pool: int, source: BonafideSource) -> None:
    if size > pool:
        raise BenchError(
            f"bonafide_size {size} is more than the {pool} images available "
            f"({BONAFIDE_POOL_ORIGIN[source]}); lower [suite].bonafide_size"
        )


def _bonafide_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(hashlib.sha256(f"{seed}:bonafide".encode()).hexdigest()[:15], 16))


def bonafide_test_indices(splits: DatasetSplits, size: int, seed: int) -> torch.Tensor:
    """The test images a `test_half` bonafide set of `size` drawn with `seed` holds (what
    `split_bonafide` gives the defender), so analyses can keep them out of their evaluation."""
    return torch.randperm(len(splits.test), generator=_bonafide_generator(seed))[:size]


def split_bonafide(
    splits: DatasetSplits, withheld_indices: torch.Tensor | None, source: BonafideSource, size: int, seed: int
) -> tuple[ImageData, ImageData]:
    """(bonafide set for the defender, evaluation set). `test_half`: a seeded half of the test
    set is the defender's pool, the other half is evaluated. `train`: the pool is the training
    images the attack neither altered nor measures itself on, and the whole test set is
    evaluated."""
    generator = _bonafide_generator(seed)
    withheld = 0 if withheld_indices is None else len(withheld_indices.unique())
    check_bonafide_size(size, bonafide_pool_size(splits, source, withheld), source)
    if source is BonafideSource.TEST_HALF:
        order = torch.randperm(len(splits.test), generator=generator)
        half = len(order) // 2
        return splits.test.subset(order[:half][:size]), splits.test.subset(order[half:])
    candidates = torch.ones(len(splits.train), dtype=torch.bool)
    if withheld_indices is not None:
        candidates[withheld_indices.cpu()] = False
    pool = candidates.nonzero().squeeze(1)[torch.randperm(int(candidates.sum()), generator=generator)]
    return splits.train.subset(pool[:size]), splits.test


def to_device(value: Any, device) -> Any:
    """Tensors inside dicts, lists and tuples moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value
