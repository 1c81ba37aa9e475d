"""A content-addressed cache of expensive artifacts (trained and attacked models, their
pre-defense metrics). A key is a hash of everything the artifact depends on; a file is written
to a temporary name and renamed, so a killed process never leaves a half-written entry."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


class ArtifactCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / f"{key}.pt"

    def get_or_create(self, kind: str, key: str, create: Callable[[], Any]) -> tuple[Any, bool]:
        """The cached value under (kind, key), or `create()` stored there. Returns (value, hit)."""
        path = self.path(kind, key)
        if path.is_file():
            try:
                return torch.load(path, map_location="cpu", weights_only=False), True
            except Exception:  # unreadable (e.g. written by an older torch): rebuild it
                path.unlink(missing_ok=True)
        value = create()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save(value, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return value, False
