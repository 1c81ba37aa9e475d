import os
import tempfile

import pytest

# Tests never touch the user's cache: decoded data and trained models go to a fresh folder.
os.environ["BENCH_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-test-cache-")
os.environ.pop("BENCH_LOAD_PLUGINS", None)
os.environ.pop("BENCH_CIFAR10_ROOT", None)


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
