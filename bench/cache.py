"""A content-addressed cache of expensive artifacts (trained and attacked models, their
pre-defense metrics). A key is a hash of everything the artifact depends on.

Each entry is checked before it is trusted: it is read with `torch.load(weights_only=True)`
(tensors and plain values only, so a planted pickle cannot run code), and it records the kind
and key it was made for and a SHA-256 of its payload. A damaged entry (flipped bytes, a file
copied over another key, a foreign structure) is reported, evicted and rebuilt. Writes go to a
unique temporary name and are renamed into place, so a killed process never leaves a
half-written entry; temporary files that a killed writer left behind are removed."""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(entry, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
