"""Defense options that cannot work are refused when the suite is read, with one line naming
the table and the reason, before anything runs."""

import pytest

from bench import OptionError
from bench_plugins.defenses.abl import AntiBackdoorLearning as Abl
from bench_plugins.defenses.neural_cleanse import NeuralCleanse
from bench_plugins.defenses.rnp import Rnp
from bench_plugins.defenses.spectral_signature import SpectralSignature


@pytest.mark.parametrize(
    "options_class, values, message",
    [
        (NeuralCleanse.Options, {"init_cost": 0.0}, "init_cost"),
        (SpectralSignature.Options, {"eps_multiplier": 3.0, "expected_pp_poison": 0.4}, "removes every image"),
        (Abl.Options, {"isolation_ratio": 1.0}, "isolates every training image"),
        (Rnp.Options, {"unlearning_milestones": [20, 10]}, "increasing order"),
        (Rnp.Options, {"unlearning_milestones": [0]}, "1 or more"),
    ],
)
def test_impossible_options_are_refused_when_the_suite_is_read(options_class, values, message):
    from bench.options import parse_options

    with pytest.raises(OptionError, match=message):
        parse_options(options_class, values, "suite.toml [[defenses]]")
    parse_options(options_class, {}, "suite.toml [[defenses]]")  # the defaults are fine
