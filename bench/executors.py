"""How jobs are run. An executor takes jobs and yields (job, outcome) pairs as they end; the
runner stores each outcome at once (only the driver writes the store). The in-process executor
runs them one after another; the Ray executor runs them as tasks on a Ray cluster, since a job
is a function of its spec (which carries its resolved plugins) and the artifact cache.

What a remote job needs besides its spec travels with it as plain data (`WorkerEnvironment`):
the cache root, the device, the deterministic-kernel switch, the CPU thread count, the working
directory and the `BENCH_*` environment variables (dataset roots, made absolute); the worker
builds its `JobEnvironment` from that, never from its own working directory or environment.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, cast

import torch

from bench.artifact_cache import ArtifactCache
from bench.artifacts import JobEnvironment, load_dataset, make_cuda_deterministic
from bench.errors import BenchError
from bench.locations import using_cache_root
from bench.jobs import AnalysisJob, Job, Outcome, content_hash
from bench.stages import _device_name, _now, execute_job, versions


class Executor(Protocol):
    def run(
        self, jobs: Iterable[Job | AnalysisJob], env: JobEnvironment
    ) -> Iterator[tuple[Job | AnalysisJob, Outcome]]: ...


class InProcessExecutor:
    """Runs jobs sequentially in this process (the default)."""

    def run(
        self, jobs: Iterable[Job | AnalysisJob], env: JobEnvironment
    ) -> Iterator[tuple[Job | AnalysisJob, Outcome]]:
        for job in jobs:
            yield job, execute_job(job, env)


@dataclass(frozen=True)
class WorkerEnvironment:
    """Everything a job needs besides its spec, as plain data for another process or node."""

    cache_root: str  # the artifact cache
    data_root: str | None  # the datasets' cache root given to the run (None: the worker's default)
    device_policy: str  # auto, cpu or cuda: resolved by the worker, which may have a GPU the driver lacks
    deterministic: bool
    cpu_threads: int
    workdir: str
    variables: dict  # BENCH_* environment variables, paths made absolute

    @classmethod
    def of(cls, env: JobEnvironment) -> "WorkerEnvironment":
        variables = {}
        for name, value in os.environ.items():
            if name.startswith("BENCH_"):
                variables[name] = str(Path(value).resolve()) if name.endswith(("_ROOT", "_DIR")) and value else value
        return cls(
            str(Path(env.cache.root).resolve()),
            None if env.cache_root is None else str(Path(env.cache_root).resolve()),
            env.device_policy,
            env.deterministic,
            torch.get_num_threads(),
            os.getcwd(),
            variables,
        )

    def job_environment(self) -> JobEnvironment:
        """Set this process up (threads, environment, deterministic kernels) and return the
        environment jobs run with."""
        os.environ.update(self.variables)
        if os.path.isdir(self.workdir):
            os.chdir(self.workdir)  # relative defaults (e.g. ./data) mean what they meant to the driver
        torch.set_num_threads(self.cpu_threads)
        if self.device_policy == "cuda" and not torch.cuda.is_available():
            raise BenchError("device 'cuda' was asked for, but this worker sees no CUDA device")
        device = torch.device("cuda" if self.device_policy != "cpu" and torch.cuda.is_available() else "cpu")
        if device.type == "cuda" and self.deterministic:
            make_cuda_deterministic()
        return JobEnvironment(
            ArtifactCache(self.cache_root),
            device,
            show_progress=False,
            deterministic=self.deterministic,
            device_policy=self.device_policy,
            cache_root=None if self.data_root is None else Path(self.data_root),
        )


def run_remote(job: Job | AnalysisJob, worker: WorkerEnvironment, *_dependencies) -> Outcome:
    """A job in a worker process (after the tasks it depends on)."""
    return execute_job(job, worker.job_environment())


def train_attacked_models(job: Job, seeds: tuple[int, ...], worker: WorkerEnvironment) -> None:
    """Train (or find in the cache) the attacked models of `job` for `seeds`: the task a group
    of jobs sharing an attacked model depends on."""
    from bench.artifacts import attacked_model

    env = worker.job_environment()
    with using_cache_root(env.cache_root):
        splits = load_dataset(job, env.device)
    for seed in seeds:
        attacked_model(job, seed, splits, env)


def attacked_model_group(job: Job) -> str:
    """Jobs with the same key share their attacked model (pure: from the specs alone)."""
    return content_hash({"model": job.model_config(), "attack_seed": job.seed if job.changes_model else None})


class RayExecutor:
    """Runs jobs as Ray tasks: one CPU per task on the CPU, one GPU per task with CUDA. Each
    distinct attacked model is trained once, by a task that the jobs needing it depend on (with
    the further models their defenses declare, e.g. MCR's second endpoint); analyses run as
    tasks of their own. Outcomes stream back as tasks end (`ray.wait`). A worker that dies (OOM,
    lost node, kill -9) makes Ray run its task again, up to `retries` times, then the job fails
    with the cause. Leaving the iteration (Ctrl-C, a time limit) cancels what has not ended."""

    remote = True  # the runner lets workers resolve the device policy

    def __init__(self, address: str | None = None, retries: int = 1, num_cpus: int | None = None):
        self.address = address
        self.retries = retries
        self.num_cpus = num_cpus

    def check_reachable(self, timeout: float = 5.0) -> None:
        """Fail fast, with one line, when nothing answers at `address` (host:port or
        ray://host:port): Ray itself retries for many minutes before giving up."""
        if self.address in (None, "auto", "local"):
            return
        target = self.address.split("://", 1)[-1]
        host, _, port = target.rpartition(":")
        if not host or not port.isdigit():
            raise BenchError(f"--ray-address {self.address}: expected HOST:PORT or ray://HOST:PORT")
        try:
            socket.create_connection((host, int(port)), timeout=timeout).close()
        except OSError as exc:
            raise BenchError(
                f"--ray-address {self.address}: nothing answers there ({exc.strerror or exc}); start the cluster "
                "(`ray start --head`) or leave out --ray-address to start a local one"
            ) from None

    def run(
        self, jobs: Iterable[Job | AnalysisJob], env: JobEnvironment
    ) -> Iterator[tuple[Job | AnalysisJob, Outcome]]:
        ray = import_ray()
        worker = WorkerEnvironment.of(env)
        started_here = not ray.is_initialized()
        if started_here:
            options: dict[str, Any] = {
                "address": self.address,
                "log_to_driver": False,
                "include_dashboard": False,
                "runtime_env": {"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", ""), **worker.variables}},
            }
            if self.address is None and self.num_cpus is not None:
                options["num_cpus"] = self.num_cpus
            ray.init(**options)
        gpu = env.device_policy == "cuda" or (env.device_policy == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
        resources = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": 1}
        remote_job = ray.remote(max_retries=self.retries, **resources)(run_remote)
        remote_models = ray.remote(max_retries=self.retries, **resources)(train_attacked_models)
        pending: dict = {}
        try:
            preparing: dict[str, object] = {}
            for job in jobs:
                dependencies = []
                if job.table == "results":  # a leaderboard job: its attacked models train first
                    leaderboard_job = cast(Job, job)
                    group = attacked_model_group(leaderboard_job)
                    if group not in preparing:
                        defense = leaderboard_job.defense.instantiate()
                        seeds = (job.seed, *defense.other_attacked_seeds(job.seed))
                        preparing[group] = remote_models.remote(job, tuple(dict.fromkeys(seeds)), worker)
                    dependencies.append(preparing[group])
                pending[remote_job.remote(job, worker, *dependencies)] = job
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                job = pending.pop(ready[0])
                yield job, self._outcome(ray, ready[0], job, env)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            if started_here:
                ray.shutdown()

    @staticmethod
    def _outcome(ray, ref, job, env: JobEnvironment) -> Outcome:
        try:
            return ray.get(ref)
        except Exception as exc:  # the worker died more often than retried, or a dependency failed
            cause = getattr(exc, "cause", None) or exc
            return Outcome(
                status="failed",
                error=f"{type(exc).__name__}: the Ray task failed: {cause}",
                device=_device_name(env.device),
                versions=versions(job),
                started_at=_now(),
                finished_at=_now(),
            )


def import_ray():
    try:
        import ray
    except ImportError:
        raise BenchError("--executor ray needs Ray: pip install 'robustness-bench[ray]'") from None
    return ray
