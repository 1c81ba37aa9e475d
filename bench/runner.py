"""`bench run`: expand a suite, skip the jobs already stored, run the rest, store each result
as it ends."""

from __future__ import annotations

import datetime
import os
import socket
import sqlite3
import threading
import re
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from bench.artifact_cache import ArtifactCache
from bench.artifacts import JobEnvironment, cuda_determinism
from bench.locations import cache_root as default_cache_root, using_cache_root
from bench.errors import BenchError, SuiteError
from bench.executors import Executor, InProcessExecutor
from bench.expansion import expand, expand_analyses
from bench.jobs import AnalysisJob, Job
from bench.preflight import preflight
from bench.stages import user_interrupts_marked
from bench.registry import Registry
from bench.store import ResultStore, check_store_path
from bench.suite import Suite


@dataclass
class RunSummary:
    total: int
    skipped: int
    succeeded: int
    failed: list[tuple[Job | AnalysisJob, str]]
    store_path: Path
    left: int = 0  # jobs not started because the time limit was reached
    elsewhere: int = 0  # jobs another bench run process had claimed (running there)


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise BenchError(
            "device 'cuda' was asked for, but torch sees no CUDA device "
            f"(torch {torch.__version__}); use --device cpu or auto"
        )
    return torch.device(choice)


def prepare(
    suite: Suite,
    registry: Registry,
    *,
    device: str | None = None,
    artifact_dir: Path | None = None,
    show_progress: bool | None = None,
    store_path: Path | None = None,
    remote: bool = False,
    cache_root: Path | None = None,
) -> tuple[list[Job | AnalysisJob], JobEnvironment]:
    """Everything checked before a job runs, writing nothing: the jobs, the device, the store
    (when given, before any data loads), then the preflight on the data and models. With
    `remote` the jobs run elsewhere: the device policy is resolved by each worker, and a driver
    without CUDA checks the suite on the CPU."""
    jobs = expand(suite) + expand_analyses(suite)
    if not jobs:
        raise SuiteError(f"{suite.path}: the [[exclude]] rules drop every job; nothing to run")
    policy = device or suite.settings.device.value
    try:
        torch_device = resolve_device("auto" if remote and policy == "cuda" else policy)
    except BenchError as exc:
        raise SuiteError(f"{suite.path}: [suite].device: {exc}" if device is None else str(exc)) from None
    if store_path is not None:
        check_store_path(store_path)
    root = Path(cache_root).expanduser() if cache_root is not None else None
    with using_cache_root(root):
        artifacts = Path(artifact_dir).expanduser() if artifact_dir else default_cache_root() / "artifacts"
    env = JobEnvironment(
        cache=ArtifactCache(resolved_cache_dir(artifacts)),
        cache_root=root,
        device=torch_device,
        show_progress=show_progress,
        deterministic=suite.settings.deterministic,
        device_policy=policy,
    )
    with using_cache_root(root):
        preflight(suite, jobs, env)
    return jobs, env


def check_suite(
    suite: Suite,
    registry: Registry,
    *,
    device: str | None = None,
    artifact_dir: Path | None = None,
    cache_root: Path | None = None,
) -> list[Job | AnalysisJob]:
    """`bench run --dry-run`: the same checks as a run (data, models, options), nothing written."""
    return prepare(suite, registry, device=device, artifact_dir=artifact_dir, cache_root=cache_root)[0]


def run_suite(
    suite: Suite,
    registry: Registry,
    *,
    store_path: Path | None = None,
    device: str | None = None,
    artifact_dir: Path | None = None,
    executor: Executor | None = None,
    show_progress: bool | None = None,
    echo: Callable[[str], None] = print,
    time_limit: float | None = None,
    only_failed: bool = False,
    cache_root: Path | None = None,
) -> RunSummary:
    """Run the suite's unfinished jobs, with the cache under `cache_root` (datasets) and
    `artifact_dir` (models and evaluations; default `<cache root>/artifacts`); neither changes
    any process-wide setting. With `time_limit` (seconds), no job is started once
    the time spent plus the longest job so far would pass the limit (the first job always
    starts); the jobs left are reported in `RunSummary.left` and a later run resumes them."""
    if time_limit is not None and time_limit <= 0:
        raise BenchError(f"the time limit must be more than 0 seconds, not {time_limit}")
    started = time.monotonic()  # the limit counts data loading in the preflight too
    store_path = Path(store_path or suite.store_path).expanduser()
    jobs, env = prepare(
        suite,
        registry,
        device=device,
        artifact_dir=artifact_dir,
        show_progress=show_progress,
        store_path=store_path,
        remote=getattr(executor, "remote", False),
        cache_root=cache_root,
    )
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deterministic = env.device.type == "cuda" and env.deterministic
    with (
        ResultStore(store_path) as store,
        user_interrupts_marked(),
        claims_renewed(store, owner),
        cuda_determinism(deterministic),
    ):
        done, todo = _jobs_to_run(store, suite, jobs, only_failed)
        echo(
            f"{suite.name}: {len(jobs)} jobs, {len(done & {j.key for j in jobs})} already in {store_path}, "
            f"{len(todo)} {'failed ' if only_failed else ''}to run on {env.device}"
        )
        deadline = None if time_limit is None else (started, time_limit)
        tally = _run_claimed(store, owner, todo, env, executor or InProcessExecutor(), show_progress, deadline)
    if tally.elsewhere:
        echo(
            f"{len(tally.elsewhere)} jobs were running in another bench run process on this store; run again "
            "after it ends to check they finished"
        )
    already = len(done & {j.key for j in jobs})
    return RunSummary(len(jobs), already, tally.succeeded, tally.failed, store_path, tally.left, len(tally.elsewhere))


def _jobs_to_run(
    store: ResultStore, suite: Suite, jobs: list[Job | AnalysisJob], only_failed: bool
) -> tuple[set[str], list[Job | AnalysisJob]]:
    """Record the suite's jobs in the store; return the keys already finished and the jobs to run."""
    store.record_suite(
        suite.name,
        str(suite.path),
        [job.key for job in jobs],
        datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    done = store.finished_keys()
    todo = [job for job in jobs if job.key not in done]
    if only_failed:  # --rerun failed: the failed jobs only, not the ones never run
        failed_before = store.failed_keys()
        todo = [job for job in todo if job.key in failed_before]
    return done, todo


@dataclass
class _Tally:
    succeeded: int = 0
    failed: list[tuple[Job | AnalysisJob, str]] = field(default_factory=list)
    left: int = 0  # not started for the time limit
    elsewhere: list[Job | AnalysisJob] = field(default_factory=list)  # claimed by another process


def _run_claimed(
    store: ResultStore,
    owner: str,
    todo: list[Job | AnalysisJob],
    env: JobEnvironment,
    executor: Executor,
    show_progress: bool | None,
    deadline: tuple[float, float] | None,
) -> _Tally:
    """Run the jobs this process can claim, recording each outcome as it arrives; stop starting
    jobs when the time spent (since `deadline[0]`) plus the longest job would pass `deadline[1]`."""
    tally = _Tally()

    def claimed(candidates):
        """The jobs this process gets to run, claimed one by one as the executor asks."""
        for job in candidates:
            if store.claim(job.key, owner, CLAIM_LEASE_SECONDS):
                yield job
            else:
                if job.key not in store.finished_keys():
                    tally.elsewhere.append(job)
                bar.update(1)

    disable = None if show_progress is None else not show_progress
    previous, longest = time.monotonic(), 0.0
    with tqdm(total=len(todo), desc="jobs", unit="job", disable=disable, dynamic_ncols=True) as bar:
        for done_count, (job, outcome) in enumerate(executor.run(claimed(todo), env), 1):
            store.record(job, outcome)
            if outcome.status == "ok":
                tally.succeeded += 1
            else:
                tally.failed.append((job, outcome.error or ""))
                first_line = (outcome.error or "").splitlines()[0] if outcome.error else "unknown error"
                where = failure_location(outcome.error or "")
                bar.write(f"FAILED {job.describe()}: {first_line}" + (f"\n  at {where}" if where else ""))
            bar.update(1)
            now = time.monotonic()
            longest, previous = max(longest, now - previous), now
            if deadline is not None and done_count < len(todo) and now - deadline[0] + longest > deadline[1]:
                tally.left = len(todo) - done_count - len(tally.elsewhere)
                bar.write(
                    f"time limit: {now - deadline[0]:.0f} s spent and the longest job took {longest:.0f} s; "
                    f"jobs not started: {tally.left}"
                )
                break  # executors are lazy: leaving the loop starts no further job
    return tally


CLAIM_LEASE_SECONDS = 120.0  # a claim not renewed for this long (its process died) can be taken over


@contextmanager
def claims_renewed(store: ResultStore, owner: str):
    """While inside, a thread renews this process's job claims every third of the lease (over
    its own SQLite connection); on the way out (normal end, failure, Ctrl-C) the claims are
    released."""
    stop = threading.Event()

    def renew():
        connection = sqlite3.connect(store.path, timeout=60, isolation_level=None)
        try:
            while not stop.wait(CLAIM_LEASE_SECONDS / 3):
                try:
                    connection.execute(
                        "UPDATE claims SET expires_at = ? WHERE owner = ?", (time.time() + CLAIM_LEASE_SECONDS, owner)
                    )
                except sqlite3.Error:
                    pass  # busy for a minute: the next renewal comes well before the lease ends
        finally:
            connection.close()

    thread = threading.Thread(target=renew, name="bench-claims", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        store.release_claims(owner)


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<function>\S+)')


def failure_location(error: str) -> str:
    """Where a failed job's traceback ends in code the user can act on: the last frame outside
    the core and torch (a plugin's file and line), else the last frame; '' without a traceback."""
    frames = [m.groupdict() for m in _FRAME.finditer(error)]
    if not frames:
        return ""
    skipped = (str(Path(__file__).resolve().parent), str(Path(torch.__file__).resolve().parent))
    outside = [f for f in frames if not f["file"].startswith(skipped)]
    frame = (outside or frames)[-1]
    return f"{frame['file']}:{frame['line']} (in {frame['function']})"


def resolved_cache_dir(path: Path) -> Path:
    """The cache folder with symlinks resolved, or one line saying why it cannot be reached."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:
        raise BenchError(f"{path}: cannot use this cache folder ({exc}); check the symlinks on its path") from None
