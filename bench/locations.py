"""Where the project keeps its files on this machine, and how it writes them. Imports nothing
heavy: the CLI's quick commands (`bench plugins`, `bench cache`) use it without loading torch."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def cache_root() -> Path:
    """The cache folder, $BENCH_CACHE_DIR, else ~/.cache/robustness-bench (not created)."""
    return Path(os.environ.get("BENCH_CACHE_DIR") or Path.home() / ".cache" / "robustness-bench").expanduser()


def write_atomically(path: Path, write: Callable[[BinaryIO], object], *, fsync: bool = False) -> None:
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
