import importlib.metadata
import os
import tempfile

import pytest

# Tests never touch the user's cache: decoded data and trained models go to a fresh folder.
os.environ["BENCH_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-test-cache-")
os.environ.pop("BENCH_LOAD_PLUGINS", None)
os.environ.pop("BENCH_CIFAR10_ROOT", None)

# This project's own entry points: the plugins every test may use.
BUILTIN_ENTRY_POINTS = ",".join(
    sorted(
        ep.name
        for ep in importlib.metadata.entry_points(group="robustness_bench")
        if ep.dist is not None and ep.dist.name == "robustness-bench"
    )
)


@pytest.fixture(autouse=True)
def only_this_projects_plugins(request, monkeypatch):
    """Tests load this project's plugins only, whatever else is installed in the environment (a
    test process's own subprocesses too); a test that installs a third-party plugin asks for it
    with `@pytest.mark.third_party_plugins`."""
    if request.node.get_closest_marker("third_party_plugins") is None:
        monkeypatch.setenv("BENCH_LOAD_PLUGINS", BUILTIN_ENTRY_POINTS)


@pytest.fixture
def registry():
    from bench.registry import load_plugins

    return load_plugins()


@pytest.fixture
def one_cpu_thread():
    """Train on one torch thread: on a busy 2-core machine, two threads waiting for each other
    train 10-50x slower (results are deterministic for a given thread count either way)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
