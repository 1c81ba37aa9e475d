"""Where the project keeps its files on this machine, and how it writes them. Imports nothing
heavy: the CLI's quick commands (`bench plugins`, `bench cache`) use it without loading torch."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

# The cache root of the run in progress (`bench run --cache-dir`), set for the run's own context
# only: no environment variable is rewritten, so two runs in one process (a notebook, a test)
# cannot leak their folders into each other.
_RUN_CACHE_ROOT: ContextVar[Path | None] = ContextVar("bench_run_cache_root", default=None)


def cache_root() -> Path:
    """The cache folder: the running suite's (`using_cache_root`), else $BENCH_CACHE_DIR, else
    ~/.cache/robustness-bench (not created)."""
    run_root = _RUN_CACHE_ROOT.get()
    if run_root is not None:
        return run_root
    return Path(os.environ.get("BENCH_CACHE_DIR") or Path.home() / ".cache" / "robustness-bench").expanduser()


@contextmanager
def using_cache_root(root: Path | str | None) -> Iterator[None]:
    """Within the block (and only in this context), `cache_root()` is `root`; None changes nothing."""
    if root is None:
        yield
        return
    token = _RUN_CACHE_ROOT.set(Path(root))
    try:
        yield
    finally:
        _RUN_CACHE_ROOT.reset(token)


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


SQLITE_MAGIC = b"SQLite format 3\x00"


def check_output_path(output: Path, *, reads: list[Path]) -> None:
    """Refuse an output path that would destroy an input: a file the command reads (the store),
    or any SQLite database. A symlink at `output` is not followed: the write replaces the link."""
    from bench.errors import BenchError

    for source in reads:
        try:
            same = output.exists() and source.exists() and os.path.samefile(output, source)
        except OSError:
            same = False
        if same or output.resolve() == source.resolve():
            raise BenchError(f"--output {output}: that is {source}, which this command reads; choose another file")
    if output.is_file() and not output.is_symlink():
        try:
            with open(output, "rb") as handle:
                is_database = handle.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
        except OSError:
            is_database = False
        if is_database:
            raise BenchError(
                f"--output {output}: that file is an SQLite database (a result store?); not overwriting it"
            )


def write_text_atomically(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a temporary file and a rename: a full disk or a
    kill leaves the previous file whole; a symlink at `path` is replaced, not followed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda handle: handle.write(text.encode("utf-8")))


MANIFEST = ".robustness-bench-written"  # in a cache folder: the names of the entries bench wrote there


def record_written(path: Path) -> None:
    """Note in the manifest of `path`'s folder that bench wrote `path` (a cache entry: a decoded
    dataset, the artifacts folder), so that `bench cache clear` removes it and nothing else."""
    manifest = path.parent / MANIFEST
    if path.name in written_entries(path.parent):
        return
    with open(manifest, "a", encoding="utf-8") as handle:  # one short appended line: atomic enough
        handle.write(path.name + "\n")


def written_entries(folder: Path) -> set[str]:
    """The names bench recorded writing in `folder` (none when it never wrote there)."""
    try:
        lines = (folder / MANIFEST).read_text(encoding="utf-8").splitlines()
    except OSError:
        return set()
    return {line for line in lines if line and "/" not in line and line not in (".", "..")}


def no_space_message(path: Path, doing: str) -> str:
    """'no space left on device while ... (N MB free)', for a full disk."""
    import shutil

    try:
        free = f"{shutil.disk_usage(Path(path).parent).free / 1e6:.0f} MB free"
    except OSError:
        free = "free space unknown"
    return f"{path}: no space left on device while {doing} ({free}); free some space and run again to resume"
