"""How jobs are run. An executor takes jobs and yields (job, outcome) pairs as they end; the
runner stores each outcome at once. The in-process executor runs them one after another; a
cluster executor (one GPU per job) only has to call `execute_job` somewhere else, since a job
is a function of its spec and the artifact cache."""

from __future__ import annotations

from typing import Iterable, Iterator, Protocol

from bench.artifacts import JobEnvironment
from bench.jobs import Job, Outcome
from bench.stages import execute_job


class Executor(Protocol):
    def run(self, jobs: Iterable[Job], env: JobEnvironment) -> Iterator[tuple[Job, Outcome]]: ...


class InProcessExecutor:
    """Runs jobs sequentially in this process (the default)."""

    def run(self, jobs: Iterable[Job], env: JobEnvironment) -> Iterator[tuple[Job, Outcome]]:
        for job in jobs:
            yield job, execute_job(job, env)
