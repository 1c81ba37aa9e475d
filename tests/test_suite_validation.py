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


def run_bad(tmp_path, text):
    store = tmp_path / "out" / "results.db"
    suite = tmp_path / "bad.toml"
    suite.write_text(text.format(store=store.as_posix()) if "{store}" in text else text)
    result = CliRunner().invoke(main, ["run", str(suite), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 2, result.output
    assert not store.exists() and not store.parent.exists(), "bad input must write nothing"
    assert "Traceback" not in result.output
    message = result.output.strip()
    assert message.count("\n") == 0, message
    return message


def replace(old, new):
    assert old in GOOD
    return GOOD.replace(old, new)


CASES = [
    ("malformed TOML", GOOD + "\n[[defenses]\n", ["bad.toml", "malformed TOML"]),
    ("unknown top-level table", GOOD + "\n[trainig]\nepochs = 2\n", ["unknown table 'trainig'", "did you mean 'training'"]),
    ("unknown dataset", replace('name = "digits"', 'name = "digit"'),
     ["datasets[0]", "unknown dataset 'digit'", "did you mean 'digits'", "installed datasets"]),
    ("unknown defense", replace('name = "none"', 'name = "fine_tune"'),
     ["defenses[0]", "unknown defense 'fine_tune'", "did you mean 'finetune'"]),
    ("unknown option", replace('name = "badnets"', 'name = "badnets"\npoison_ratio = 0.1'),
     ["attacks[0] ('badnets')", "unknown option 'poison_ratio'", "did you mean 'poison_rate'", "valid options"]),
    ("wrong type", replace('name = "badnets"', 'name = "badnets"\npoison_rate = "high"'),
     ["poison_rate", "expected a number", "'high'"]),
    ("poison rate above 1", replace('name = "badnets"', 'name = "badnets"\npoison_rate = 1.5'),
     ["poison_rate", "1.5 is out of range", "<= 1"]),
    ("negative bonafide budget", replace("bonafide_size = 50", "bonafide_size = -5"),
     ["[suite].bonafide_size[0]", "-5 is out of range", ">= 1"]),
    ("seeds of the wrong type", replace("seeds = [0]", 'seeds = "zero"'), ["[suite].seeds", "expected a list"]),
    ("trigger of size zero", replace('name = "badnets"', 'name = "badnets"\ntrigger_size = 0'),
     ["trigger_size", "0 is out of range", ">= 1"]),
    ("boolean for an integer", replace('name = "badnets"', 'name = "badnets"\ntarget_class = true'),
     ["target_class", "expected an integer", "a boolean"]),
    ("unknown training key", replace("epochs = 1", "epoch = 1"),
     ["[training]", "unknown key 'epoch'", "did you mean 'epochs'"]),
    ("zero epochs", replace("epochs = 1", "epochs = 0"), ["[training].epochs", "0 is out of range"]),
    ("missing attacks", replace('[[attacks]]\nname = "badnets"', ""), ["missing 'attacks'", "[[attacks]]"]),
    ("plugin without a name", replace('name = "badnets"', 'poison_rate = 0.1'), ["attacks[0]", "missing 'name'"]),
    ("unknown device", replace("seeds = [0]", 'seeds = [0]\ndevice = "tpu"'),
     ["[suite].device", "'tpu' is not valid", "'cpu'"]),
    ("unknown bonafide source", replace("seeds = [0]", 'seeds = [0]\nbonafide_source = "tests"'),
     ["bonafide_source", "'tests' is not valid", "'test_half'"]),
    ("unknown exclude key", GOOD + '\n[[exclude]]\ndefence = "none"\n',
     ["exclude[0].defence", "did you mean 'defense'"]),
    ("empty seed list", replace("seeds = [0]", "seeds = []"), ["[suite].seeds", "at least one value"]),
    ("repeated seed", replace("seeds = [0]", "seeds = [1, 1]"), ["[suite].seeds", "repeats a value"]),
    ("empty sweep", replace('name = "badnets"', 'name = "badnets"\npoison_rate = []'),
     ["poison_rate", "empty list sweeps nothing"]),
    ("trigger value above 255", replace('name = "badnets"', 'name = "badnets"\ntrigger_value = 256'),
     ["trigger_value", "256 is out of range"]),
    ("enum option typo", replace('name = "badnets"', 'name = "badnets"\ntrigger_corner = "bottom-right"'),
     ["trigger_corner", "did you mean 'bottom_right'"]),
    # problems only the data reveals, still caught before anything is written
    ("bonafide budget above the pool",
     replace("bonafide_size = 50", "bonafide_size = 400").replace('name = "none"', 'name = "finetune"'),
     ["[suite].bonafide_size 400 is more than the 269 images", "'digits'", "half of its test set"]),
    ("target class the dataset lacks", replace('name = "badnets"', 'name = "badnets"\ntarget_class = 12'),
     ["attack 'badnets(target_class=12)'", "target_class 12 does not exist", "classes 0..9"]),
    ("trigger larger than the images", replace('name = "badnets"', 'name = "badnets"\ntrigger_size = 9'),
     ["a 9-pixel trigger", "does not fit in 8x8 images"]),
    ("missing dataset files", replace('name = "digits"', 'name = "cifar10"\nroot = "/nonexistent/cifar"'),
     ["dataset 'cifar10(root=\"/nonexistent/cifar\")'", "looked in: /nonexistent/cifar", "BENCH_CIFAR10_ROOT"]),
    ("bonafide budget above the training images the attack leaves alone",
     replace("bonafide_size = 50", 'bonafide_size = 1200\nbonafide_source = "train"').replace('name = "none"', 'name = "finetune"'),
     ["[suite].bonafide_size 1200 is more than the 1132 images", "leaves alone"]),
    ("poison rate the non-target classes cannot supply",
     replace('name = "badnets"', 'name = "badnets"\npoison_rate = 0.95'),
     ["poison_rate 0.95 asks for 1195 poisoned images", "outside the target class"]),
    ("exclude naming no configured plugin", GOOD + '\n[[exclude]]\ndefense = "finetune"\n',
     ["exclude[0].defense", "'finetune' matches no configured defense", "configured: none"]),
    ("exclude naming a seed the suite lacks", GOOD + '\n[[exclude]]\nseed = 5\n',
     ["exclude[0].seed", "5 is not among the suite's seed values [0]"]),
    ("exclude pairing a bonafide size with a defense that uses none", GOOD + '\n[[exclude]]\ndefense = "none"\nbonafide_size = 50\n',
     ["exclude[0]", "defense 'none' uses no bonafide data", "drop bonafide_size"]),
    # problems only the model reveals: its layers
    ("fine-pruning layer the model lacks", replace('name = "none"', 'name = "fine_pruning"\nlayer = "net.conv9"'),
     ["model 'small_cnn', defense 'fine_pruning(layer=\"net.conv9\")'", "the model has no module 'net.conv9'",
      "candidates: "]),
    ("error-injection parameter the model lacks", replace('name = "badnets"', 'name = "error_injection"\nlayer = "fc.weight"'),
     ["model 'small_cnn', attack 'error_injection(layer=\"fc.weight\")'", "no parameter 'fc.weight'"]),
    ("plugin list not an array of tables", "models = 3\n" + replace('[[models]]\nname = "small_cnn"', ''),
     ["'models' must be a non-empty array of tables"]),
]


@pytest.mark.parametrize("text, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_suite_is_refused_with_a_precise_message(tmp_path, text, expected):
    message = run_bad(tmp_path, text)
    assert message.startswith("error: ")
    for fragment in expected:
        assert fragment in message


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
