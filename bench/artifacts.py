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

import hashlib
import io
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch
from torch import nn

import bench
from bench.attacks import Attack, Stage
from bench.context import RunContext
from bench.data import DatasetSplits, ImageData
from bench.errors import BenchError
from bench.jobs import BonafideSource, Job, content_hash
from bench.models import Classifier, InputShape
from bench.training import train_classifier


def cache_root() -> Path:
    """The cache folder, $BENCH_CACHE_DIR, else ~/.cache/robustness-bench (not created)."""
    return Path(os.environ.get("BENCH_CACHE_DIR") or Path.home() / ".cache" / "robustness-bench").expanduser()


def cache_dir() -> Path:
    """Where decoded datasets are cached (`cache_root()`), created if needed."""
    path = cache_root()
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_atomically(path: Path, write: Callable[[BinaryIO], None], *, fsync: bool = False) -> None:
    """Call `write(handle)` on a unique temporary file beside `path`, then rename it into place:
    a reader never sees half a file, two writers never share a temporary file, and a killed
    writer leaves only a `*.tmp` file (removed by `remove_stale_temporaries`)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_arrays_atomically(path: Path, arrays: dict) -> None:
    """Write numpy arrays to `path` (.npz) atomically (`write_atomically`)."""
    import numpy as np

    write_atomically(path, lambda handle: np.savez(handle, **arrays))


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
        path = self.path(kind, key)
        if path.is_file():
            try:
                return read_entry(path, kind, key), True
            except CacheEntryError as exc:
                self.report(f"cache: {path}: {exc}; rebuilding it")
                path.unlink(missing_ok=True)
        value = create()
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path.parent)
        write_entry(path, kind, key, value)
        return value, False


def write_entry(path: Path, kind: str, key: str, value: Any) -> None:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    payload = buffer.getvalue()
    entry = {"format": FORMAT, "kind": kind, "key": key, "sha256": hashlib.sha256(payload).hexdigest(),
             "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}
    write_atomically(path, lambda handle: torch.save(entry, handle), fsync=True)


def read_entry(path: Path, kind: str, key: str) -> Any:
    """The payload of a checked entry; raises `CacheEntryError` saying what is wrong."""
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, truncated, or holding objects beyond plain data
        raise CacheEntryError(f"unreadable or not plain data ({type(exc).__name__})") from None
    if not isinstance(entry, dict) or entry.get("format") != FORMAT or not isinstance(entry.get("payload"), torch.Tensor):
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


def model_key(job: Job, seed: int, splits: DatasetSplits, device: torch.device) -> str:
    """Everything the attacked model depends on: its config, the training seed, the seed of the
    attack's own draws (the job's: a second model for the same job carries the same attack),
    the data read, the kind of device (CUDA trains in bf16), the CPU thread count, and the
    providers' versions."""
    config = {**job.model_config(), "seed": seed}
    if job.attack.cls.stage is not Stage.TEST_TIME:
        config["attack_seed"] = job.seed
    providers = {kind: getattr(job, kind).provider for kind in ("dataset", "model", "attack")}
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
                "attack_state": to_device(state, "cpu"), "train_losses": losses}

    value, hit = env.cache.get_or_create("models", model_key(job, seed, splits, env.device), create)
    model = build_model(job, splits)
    model.load_state_dict(value["state_dict"])
    model = ctx.prepare(model).eval()
    return model, to_device(value["attack_state"], env.device), hit


BONAFIDE_POOL_ORIGIN = {BonafideSource.TEST_HALF: "half of the test set",
                        BonafideSource.TRAIN: "training images the attack left alone"}


def bonafide_pool_size(splits: DatasetSplits, source: BonafideSource, withheld: int) -> int:
    """How many images the defender's pool has, `withheld` training images being the attack's
    (poisoned or measured): what `split_bonafide` draws from, known before any training."""
    return len(splits.test) // 2 if source is BonafideSource.TEST_HALF else len(splits.train) - withheld


def check_bonafide_size(size: int, pool: int, source: BonafideSource) -> None:
    if size > pool:
        raise BenchError(f"bonafide_size {size} is more than the {pool} images available "
                         f"({BONAFIDE_POOL_ORIGIN[source]}); lower [suite].bonafide_size")


def split_bonafide(splits: DatasetSplits, withheld_indices: torch.Tensor | None, source: BonafideSource,
                   size: int, seed: int) -> tuple[ImageData, ImageData]:
    """(bonafide set for the defender, evaluation set). `test_half`: a seeded half of the test
    set is the defender's pool, the other half is evaluated. `train`: the pool is the training
    images the attack neither altered nor measures itself on, and the whole test set is
    evaluated."""
    generator = torch.Generator().manual_seed(int(hashlib.sha256(f"{seed}:bonafide".encode()).hexdigest()[:15], 16))
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
