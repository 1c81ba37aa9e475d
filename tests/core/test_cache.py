"""The artifact cache trusts an entry only after checking it."""

import os
import pickle
import time

import torch

from bench.artifact_cache import STALE_TEMPORARY_SECONDS, ArtifactCache


def quiet_cache(root, messages):
    return ArtifactCache(root, report=messages.append)


def test_a_hit_returns_what_was_stored(tmp_path):
    cache = quiet_cache(tmp_path, [])
    value = {"state_dict": {"w": torch.arange(6.0).view(2, 3)}, "losses": [0.5, 0.25], "note": "x"}
    assert cache.get_or_create("models", "k1", lambda: value) == (value, False)
    again, hit = cache.get_or_create("models", "k1", lambda: 1 / 0)
    assert hit and torch.equal(again["state_dict"]["w"], value["state_dict"]["w"]) and again["losses"] == [0.5, 0.25]


class Planted:
    def __reduce__(self):
        return (os.system, ("touch planted-ran",))


def test_a_planted_pickle_never_runs_and_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    messages = []
    cache = quiet_cache(tmp_path / "c", messages)
    path = cache.path("models", "k1")
    path.parent.mkdir(parents=True)
    path.write_bytes(pickle.dumps(Planted()))
    value, hit = cache.get_or_create("models", "k1", lambda: {"ok": 1})
    assert (value, hit) == ({"ok": 1}, False)
    assert not (tmp_path / "planted-ran").exists()
    assert "unreadable or not plain data" in messages[0] and "rebuilding" in messages[0]


def test_flipped_bytes_and_an_entry_copied_over_another_key_are_detected(tmp_path):
    messages = []
    cache = quiet_cache(tmp_path, messages)
    cache.get_or_create("evaluations", "a", lambda: {"asr": 0.9})
    cache.get_or_create("evaluations", "b", lambda: {"asr": 0.1})
    # an entry copied over another key
    cache.path("evaluations", "b").write_bytes(cache.path("evaluations", "a").read_bytes())
    assert cache.get_or_create("evaluations", "b", lambda: {"asr": 0.2}) == ({"asr": 0.2}, False)
    assert "made for evaluations/a" in messages[-1]
    # a flipped byte inside the payload
    entry = torch.load(cache.path("evaluations", "a"), weights_only=True)
    entry["payload"][-20] ^= 0xFF
    torch.save(entry, cache.path("evaluations", "a"))
    assert cache.get_or_create("evaluations", "a", lambda: {"asr": 0.3}) == ({"asr": 0.3}, False)
    assert "checksum mismatch" in messages[-1]
    # a file cut short (a disk filled up, a copy interrupted)
    path = cache.path("evaluations", "a")
    path.write_bytes(path.read_bytes()[:100])
    assert cache.get_or_create("evaluations", "a", lambda: {"asr": 0.4}) == ({"asr": 0.4}, False)
    assert "unreadable" in messages[-1] and str(path) in messages[-1]


def test_temporaries_of_killed_writers_are_removed_but_fresh_ones_kept(tmp_path):
    cache = quiet_cache(tmp_path, [])
    folder = tmp_path / "models"
    folder.mkdir()
    old, fresh = folder / "x.abc.tmp", folder / "y.def.tmp"
    old.write_bytes(b"half"), fresh.write_bytes(b"half")
    past = time.time() - STALE_TEMPORARY_SECONDS - 10
    os.utime(old, (past, past))
    cache.get_or_create("models", "k", lambda: {"v": 1})
    assert not old.exists() and fresh.exists()


def test_model_keys_change_with_the_plugins_code_and_with_the_machine(tmp_path, monkeypatch):
    """A cached model must not outlive an edit of the code that made it (an editable install
    keeps its version), nor move to a machine whose kernels compute differently."""
    import importlib
    import sys

    import torch

    from bench import artifacts

    package = tmp_path / "edited_plugin"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "defense.py").write_text("class Defense:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cls = importlib.import_module("edited_plugin.defense").Defense
    before = artifacts.code_fingerprint(cls)
    (package / "helpers.py").write_text("SCALE = 2\n")  # a helper module of the same package counts too
    artifacts._package_digest.cache_clear()
    assert artifacts.code_fingerprint(cls) != before
    sys.modules.pop("edited_plugin.defense", None)

    cpu = torch.device("cpu")
    here = artifacts.machine_fingerprint(cpu)
    assert here["torch"] == torch.__version__ and here["cpu_capability"]
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41")
    there = artifacts.machine_fingerprint(cpu)
    assert there != here and there["cpu_capability"] == "DEFAULT"
