"""Cache keys: what an artifact depends on, hashed. A model's key names its configuration,
seeds, the data's pixels, the code that makes it (the core's and each plugin package's files)
and the machine (torch's version and the kernels it picks); a defended model's adds the defense
and the defender's data."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

import bench
from bench.data import DatasetSplits
from bench.jobs import Job, content_hash


def data_fingerprint(splits: DatasetSplits) -> str:
    """A hash of every pixel and label, so that cached models follow the data actually read
    (e.g. the JPEG copy versus the official CIFAR-10 files under the same suite)."""
    digest = hashlib.sha256()
    for tensor in (splits.train.x, splits.train.y, splits.test.x, splits.test.y):
        digest.update(tensor.contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:20]


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
    try:
        spec = importlib.util.find_spec(package)
    except ValueError:  # a class defined in a script or notebook (__main__ has no spec)
        return "unfindable"
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
