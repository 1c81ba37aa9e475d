"""The content-addressed artifact cache: trained and attacked models, defended models and
pre-defense evaluations, each under a key of everything it depends on (`bench.keys`). Each entry
is checked before it is trusted: read with `torch.load(weights_only=True)` (tensors and plain
values only, so a planted pickle cannot run code), it records the kind and key it was made for
and a SHA-256 of its payload; a damaged entry is reported, evicted and rebuilt. Also the cache
root for dataset plugins (`cache_dir`, `save_arrays_atomically`)."""

from __future__ import annotations

import errno
import hashlib
import io
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import filelock
import torch

from bench.errors import BenchError
from bench.locations import cache_root, no_space_message, record_written, write_atomically


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
