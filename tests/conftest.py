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
