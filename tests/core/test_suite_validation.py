"""Bad input: one line naming the file, the key, the value and what is valid; exit status 2;
nothing written."""

import pytest
from click.testing import CliRunner

from bench.cli import main

GOOD = """
[suite]
seeds = [0]
bonafide_size = 50
store = "{store}"

[training]
epochs = 1

[[datasets]]
name = "digits"

[[models]]
name = "small_cnn"

[[attacks]]
name = "badnets"

[[defenses]]
name = "none"
"""


def run_bad(tmp_path, text, device="cpu"):
    store = tmp_path / "out" / "results.db"
    suite = tmp_path / "bad.toml"
    suite.write_text(text.format(store=store.as_posix()) if "{store}" in text else text)
    options = ["--device", device] if device else []
    result = CliRunner().invoke(
        main, ["run", str(suite), *options, "--no-progress"], env={"BENCH_CACHE_DIR": str(tmp_path / "cache")}
    )
    assert result.exit_code == 2, result.output
    assert not store.exists() and not store.parent.exists(), "bad input must write nothing"
    assert not (tmp_path / "cache").exists(), "a failed preflight leaves no cache folder"
    assert "Traceback" not in result.output
    message = result.output.strip()
    assert message.count("\n") == 0, message
    return message


def replace(old, new):
    assert old in GOOD
    return GOOD.replace(old, new)


CASES = [
    ("malformed TOML", GOOD + "\n[[defenses]\n", ["bad.toml", "malformed TOML"]),
    (
        "unknown top-level table",
        GOOD + "\n[trainig]\nepochs = 2\n",
        ["unknown table 'trainig'", "did you mean 'training'"],
    ),
    (
        "unknown dataset",
        replace('name = "digits"', 'name = "digit"'),
        ["datasets[0]", "unknown dataset 'digit'", "did you mean 'digits'", "installed datasets"],
    ),
    (
        "unknown defense",
        replace('name = "none"', 'name = "fine_tune"'),
        ["defenses[0]", "unknown defense 'fine_tune'", "did you mean 'finetune'"],
    ),
    (
        "unknown option",
        replace('name = "badnets"', 'name = "badnets"\npoison_ratio = 0.1'),
        ["attacks[0] ('badnets')", "unknown option 'poison_ratio'", "did you mean 'poison_rate'", "valid options"],
    ),
    (
        "wrong type",
        replace('name = "badnets"', 'name = "badnets"\npoison_rate = "high"'),
        ["poison_rate", "expected a number", "'high'"],
    ),
    (
        "poison rate above 1",
        replace('name = "badnets"', 'name = "badnets"\npoison_rate = 1.5'),
        ["poison_rate", "1.5 is out of range", "<= 1"],
    ),
    (
        "negative bonafide budget",
        replace("bonafide_size = 50", "bonafide_size = -5"),
        ["[suite].bonafide_size[0]", "-5 is out of range", ">= 1"],
    ),
    ("seeds of the wrong type", replace("seeds = [0]", 'seeds = "zero"'), ["[suite].seeds", "expected a list"]),
    (
        "trigger of size zero",
        replace('name = "badnets"', 'name = "badnets"\ntrigger_size = 0'),
        ["trigger_size", "0 is out of range", ">= 1"],
    ),
    (
        "boolean for an integer",
        replace('name = "badnets"', 'name = "badnets"\ntarget_class = true'),
        ["target_class", "expected an integer", "a boolean"],
    ),
    (
        "unknown training key",
        replace("epochs = 1", "epoch = 1"),
        ["[training]", "unknown key 'epoch'", "did you mean 'epochs'"],
    ),
    ("zero epochs", replace("epochs = 1", "epochs = 0"), ["[training].epochs", "0 is out of range"]),
    ("missing attacks", replace('[[attacks]]\nname = "badnets"', ""), ["missing 'attacks'", "[[attacks]]"]),
    ("plugin without a name", replace('name = "badnets"', "poison_rate = 0.1"), ["attacks[0]", "missing 'name'"]),
    (
        "unknown device",
        replace("seeds = [0]", 'seeds = [0]\ndevice = "tpu"'),
        ["[suite].device", "'tpu' is not valid", "'cpu'"],
    ),
    (
        "unknown bonafide source",
        replace("seeds = [0]", 'seeds = [0]\nbonafide_source = "tests"'),
        ["bonafide_source", "'tests' is not valid", "'test_half'"],
    ),
    (
        "unknown exclude key",
        GOOD + '\n[[exclude]]\ndefence = "none"\n',
        ["exclude[0].defence", "did you mean 'defense'"],
    ),
    ("empty seed list", replace("seeds = [0]", "seeds = []"), ["[suite].seeds", "at least one value"]),
    ("repeated seed", replace("seeds = [0]", "seeds = [1, 1]"), ["[suite].seeds", "repeats a value"]),
    (
        "empty sweep",
        replace('name = "badnets"', 'name = "badnets"\npoison_rate = []'),
        ["poison_rate", "empty list sweeps nothing"],
    ),
    (
        "trigger value above 255",
        replace('name = "badnets"', 'name = "badnets"\ntrigger_value = 256'),
        ["trigger_value", "256 is out of range"],
    ),
    (
        "enum option typo",
        replace('name = "badnets"', 'name = "badnets"\ntrigger_corner = "bottom-right"'),
        ["trigger_corner", "did you mean 'bottom_right'"],
    ),
    # problems only the data reveals, still caught before anything is written
    (
        "bonafide budget above the pool",
        replace("bonafide_size = 50", "bonafide_size = 400").replace('name = "none"', 'name = "finetune"'),
        ["[suite].bonafide_size 400 is more than the 269 images", "'digits'", "half of the test set"],
    ),
    (
        "target class the dataset lacks",
        replace('name = "badnets"', 'name = "badnets"\ntarget_class = 12'),
        ["attack 'badnets(target_class=12)'", "target_class 12 does not exist", "classes 0..9"],
    ),
    (
        "trigger larger than the images",
        replace('name = "badnets"', 'name = "badnets"\ntrigger_size = 9'),
        ["a 9-pixel trigger", "does not fit in 8x8 images"],
    ),
    (
        "missing dataset files",
        replace('name = "digits"', 'name = "cifar10"\nroot = "/nonexistent/cifar"'),
        ["dataset 'cifar10(root=\"/nonexistent/cifar\")'", "looked in: /nonexistent/cifar", "BENCH_CIFAR10_ROOT"],
    ),
    (
        "bonafide budget above the training images the attack leaves alone",
        replace("bonafide_size = 50", 'bonafide_size = 1200\nbonafide_source = "train"').replace(
            'name = "none"', 'name = "finetune"'
        ),
        ["[suite].bonafide_size 1200 is more than the 1132 images", "attack left alone"],
    ),
    (
        "poison rate the non-target classes cannot supply",
        replace('name = "badnets"', 'name = "badnets"\npoison_rate = 0.95'),
        ["poison_rate 0.95 asks for 1195 poisoned images", "outside the target class"],
    ),
    (
        "exclude naming no configured plugin",
        GOOD + '\n[[exclude]]\ndefense = "finetune"\n',
        ["exclude[0].defense", "'finetune' matches no configured defense", "configured: none"],
    ),
    (
        "exclude naming a seed the suite lacks",
        GOOD + "\n[[exclude]]\nseed = 5\n",
        ["exclude[0].seed", "5 is not among the suite's seed values [0]"],
    ),
    (
        "exclude pairing a bonafide size with a defense that uses none",
        GOOD + '\n[[exclude]]\ndefense = "none"\nbonafide_size = 50\n',
        ["exclude[0]", "defense 'none' uses no bonafide data", "drop bonafide_size"],
    ),
    # problems only the model reveals: its layers
    (
        "fine-pruning layer the model lacks",
        replace('name = "none"', 'name = "fine_pruning"\nlayer = "net.conv9"'),
        [
            "model 'small_cnn', defense 'fine_pruning(layer=\"net.conv9\")'",
            "the model has no module 'net.conv9'",
            "candidates: ",
        ],
    ),
    (
        "error-injection parameter the model lacks",
        replace('name = "badnets"', 'name = "error_injection"\nlayer = "fc.weight"'),
        ["model 'small_cnn', attack 'error_injection(layer=\"fc.weight\")'", "no parameter 'fc.weight'"],
    ),
    (
        "plugin list not an array of tables",
        "models = 3\n" + replace('[[models]]\nname = "small_cnn"', ""),
        ["'models' must be a non-empty array of tables"],
    ),
    # non-finite numbers are never options
    ("nan learning rate", replace("epochs = 1", "epochs = 1\nlr = nan"), ["[training].lr", "expected a finite number"]),
    (
        "infinite poison rate",
        replace('name = "badnets"', 'name = "badnets"\npoison_rate = inf'),
        ["poison_rate", "expected a finite number, got inf"],
    ),
    (
        "nan poison rate",
        replace('name = "badnets"', 'name = "badnets"\npoison_rate = nan'),
        ["poison_rate", "expected a finite number, got nan"],
    ),
    ("nan eps", replace('name = "badnets"', 'name = "pgd"\neps = nan'), ["('pgd').eps", "finite number"]),
    (
        "negative infinite weight decay",
        replace('name = "none"', 'name = "finetune"\nweight_decay = -inf'),
        ["weight_decay", "finite number"],
    ),
    (
        "nan in a sweep",
        replace('name = "badnets"', 'name = "badnets"\npoison_rate = [0.1, nan]'),
        ["poison_rate", "finite number"],
    ),
    ("nan mcr t", replace('name = "none"', 'name = "mcr"\nt = nan'), ["('mcr').t", "finite number"]),
    # seeds and sizes
    (
        "seed beyond 63 bits",
        replace("seeds = [0]", "seeds = [18446744073709551616]"),
        ["[suite].seeds[0]", "out of range", "9223372036854775807"],
    ),
    ("negative seed", replace("seeds = [0]", "seeds = [-1]"), ["[suite].seeds[0]", "-1 is out of range"]),
    ("repeated seed", replace("seeds = [0]", "seeds = [1, 1]"), ["[suite].seeds", "repeats a value"]),
    ("empty seeds", replace("seeds = [0]", "seeds = []"), ["[suite].seeds", "at least one value"]),
    ("zero bonafide size", replace("bonafide_size = 50", "bonafide_size = 0"), ["bonafide_size[0]", "out of range"]),
    ("seed as a string", replace("seeds = [0]", 'seeds = ["zero"]'), ["[suite].seeds[0]", "expected an integer"]),
    (
        "huge integer option",
        replace('name = "badnets"', 'name = "badnets"\ntarget_class = 99999999999999999999'),
        ["target_class", "out of range"],
    ),
    # exclusions
    ("empty exclude table", GOOD + "\n[[exclude]]\n", ["exclude[0] is empty", "would drop every job"]),
    (
        "exclusions that leave no job",
        GOOD + '\n[[exclude]]\ndataset = "digits"\n',
        ["the [[exclude]] rules drop every job"],
    ),
    ("exclude not a table", "exclude = 3\n" + GOOD, ["'exclude' must be an array of tables"]),
    (
        "exclude with an unknown key",
        GOOD + '\n[[exclude]]\nattacks = "badnets"\n',
        ["exclude[0].attacks", "did you mean 'attack'"],
    ),
    # names and labels
    ("plugin name not a string", replace('name = "digits"', "name = 5"), ["datasets[0].name", "expected a string"]),
    ("plugin table without a name", replace('name = "none"', 'label = "x"'), ["defenses[0]", "missing 'name'"]),
    (
        "suite name that is a path",
        replace("seeds = [0]", 'name = "../../x"\nseeds = [0]'),
        ["[suite].name", "'../../x' is not a valid suite name"],
    ),
    ("suite name with a slash", replace("seeds = [0]", 'name = "a/b"\nseeds = [0]'), ["not a valid suite name"]),
    (
        "one label for two configurations",
        replace(
            '[[defenses]]\nname = "none"',
            '[[defenses]]\nname = "finetune"\nlabel = "ft"\nepochs = 1\n\n'
            '[[defenses]]\nname = "finetune"\nlabel = "ft"\nepochs = 2',
        ),
        ["the label 'ft' names two configurations with different options"],
    ),
    (
        "the same configuration twice",
        replace('[[defenses]]\nname = "none"', '[[defenses]]\nname = "none"\n\n[[defenses]]\nname = "none"'),
        ["'none' is configured twice with the same options"],
    ),
    (
        "label not a string",
        replace('name = "none"', 'name = "none"\nlabel = 3'),
        ["defenses[0].label", "expected a string"],
    ),
    # option types and ranges of the repair defenses
    (
        "holdout fraction of 1",
        replace('name = "none"', 'name = "mcr"\nholdout_fraction = 1.0'),
        ["holdout_fraction", "out of range"],
    ),
    (
        "negative samples per epoch",
        replace('name = "none"', 'name = "finetune"\nsamples_per_epoch = -5'),
        ["samples_per_epoch", "-5 is out of range"],
    ),
    (
        "t selection typo",
        replace('name = "none"', 'name = "mcr"\nt_selection = "clean"'),
        ["t_selection", "expected one of 'fixed', 'clean_rule'"],
    ),
    ("boolean for an integer", replace("epochs = 1", "epochs = true"), ["[training].epochs", "expected an integer"]),
    (
        "string for a boolean",
        replace('name = "none"', 'name = "finetune"\naugment = "yes"'),
        ["augment", "expected true or false"],
    ),
    ("unknown training key", replace("epochs = 1", "epoch = 1"), ["[training]", "did you mean 'epochs'"]),
    ("unknown top-level table", GOOD + "\n[sweep]\nx = 1\n", ["unknown table 'sweep'"]),
    (
        "suite table that is not a table",
        "suite = 3\n" + GOOD.replace("[suite]\n", "[other]\n", 1),
        ["unknown table 'other'"],
    ),
]


@pytest.mark.parametrize("text, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_suite_is_refused_with_a_precise_message(tmp_path, text, expected):
    message = run_bad(tmp_path, text)
    assert message.startswith("error: ")
    for fragment in expected:
        assert fragment in message


def test_device_cuda_without_cuda_names_the_file_and_key(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    message = run_bad(tmp_path, replace("seeds = [0]", 'seeds = [0]\ndevice = "cuda"'), device=None)
    assert "bad.toml: [suite].device: device 'cuda' was asked for" in message


@pytest.mark.parametrize("problem", ["folder is a file", "store is a folder", "not sqlite", "foreign sqlite"])
def test_store_problems_are_found_before_any_data_loads(tmp_path, problem, monkeypatch):
    import sqlite3

    from bench import preflight

    store = tmp_path / "out" / "results.db"
    if problem == "folder is a file":
        store.parent.write_text("a file")
        expected = "is a file, not a folder"
    elif problem == "store is a folder":
        store.mkdir(parents=True)
        expected = "the result store is a folder"
    elif problem == "not sqlite":
        store.parent.mkdir()
        store.write_text("hello")
        expected = "not an SQLite file"
    else:
        store.parent.mkdir()
        with sqlite3.connect(store) as db:
            db.execute("CREATE TABLE customers (id INTEGER)")
        expected = "not a robustness-bench store (its tables: customers)"
    before = store.read_bytes() if store.is_file() else None
    monkeypatch.setattr(preflight, "load_dataset", lambda *a: pytest.fail("data loaded before the store was checked"))
    suite = tmp_path / "s.toml"
    suite.write_text(GOOD.format(store=store.as_posix()))
    result = CliRunner().invoke(main, ["run", str(suite), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 2, result.output
    assert expected in result.output and result.output.strip().count("\n") == 0
    if before is not None:
        assert store.read_bytes() == before


def test_a_folder_given_as_the_suite(tmp_path):
    result = CliRunner().invoke(main, ["run", str(tmp_path)])
    assert result.exit_code == 2
    assert "is a folder, not a suite file" in result.output


def test_missing_suite_file(tmp_path):
    result = CliRunner().invoke(main, ["run", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2
    assert "nope.toml: no such suite file" in result.output


def test_good_suite_dry_run_lists_jobs(tmp_path):
    suite = tmp_path / "good.toml"
    suite.write_text(GOOD.format(store=(tmp_path / "r.db").as_posix()))
    result = CliRunner().invoke(main, ["run", str(suite), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "digits / small_cnn / badnets / none seed=0" in result.output
    assert "1 jobs" in result.output
    assert not (tmp_path / "r.db").exists()


def test_dry_run_makes_the_same_checks_as_a_run(tmp_path):
    suite = tmp_path / "s.toml"
    suite.write_text(
        replace('name = "none"', 'name = "fine_pruning"\nlayer = "net.conv9"').format(
            store=(tmp_path / "r.db").as_posix()
        )
    )
    result = CliRunner().invoke(main, ["run", str(suite), "--dry-run", "--device", "cpu"])
    assert result.exit_code == 2 and "the model has no module 'net.conv9'" in result.output
    assert not (tmp_path / "r.db").exists()


def test_a_label_too_long_for_a_table_or_a_file_name_is_refused_at_load(tmp_path, registry):
    from bench.errors import SuiteError
    from bench.suite import load_suite
    from bench_plugins.testing import write_suite

    path = write_suite(tmp_path / "s.toml", defenses=[{"name": "none", "label": "x" * 500}])
    with pytest.raises(SuiteError, match="500 characters long"):
        load_suite(path, registry)


def test_a_suite_expanding_to_too_many_jobs_is_refused_before_any_is_built(tmp_path, registry):
    import time

    from bench.errors import SuiteError
    from bench.suite import load_suite
    from bench_plugins.testing import write_suite

    sweep = {"name": "finetune", "epochs": list(range(1, 1001)), "lr": [0.01 * i for i in range(1, 1001)]}
    path = write_suite(tmp_path / "s.toml", defenses=[sweep])
    start = time.perf_counter()
    with pytest.raises(SuiteError, match="1,000,000 configurations, more than"):
        load_suite(path, registry)
    assert time.perf_counter() - start < 5
    sizes = list(range(10, 261, 10))  # 26 sizes x 200 seeds x 2 defenses = 10,400 jobs
    path = write_suite(tmp_path / "t.toml", seeds=list(range(200)), defenses=["none", "finetune"], bonafide_size=sizes)
    with pytest.raises(SuiteError, match="expands to 10,400 jobs"):
        load_suite(path, registry)
    raised = write_suite(
        tmp_path / "u.toml", seeds=list(range(200)), defenses=["none", "finetune"], bonafide_size=sizes, max_jobs=20000
    )
    assert load_suite(raised, registry).settings.max_jobs == 20000


def test_toml_nested_too_deeply_is_one_line(tmp_path, registry):
    from bench.errors import SuiteError
    from bench.suite import load_suite

    path = tmp_path / "deep.toml"
    path.write_text("x = " + "[" * 900 + "]" * 900 + "\n")
    with pytest.raises(SuiteError, match="malformed TOML"):
        load_suite(path, registry)
