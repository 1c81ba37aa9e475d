"""Where the project keeps its files on this machine. Imports nothing heavy: the CLI's quick
commands (`bench plugins`, `bench cache`) use it without loading torch."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The cache folder, $BENCH_CACHE_DIR, else ~/.cache/robustness-bench (not created)."""
    return Path(os.environ.get("BENCH_CACHE_DIR") or Path.home() / ".cache" / "robustness-bench").expanduser()
