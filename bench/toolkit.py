"""The public toolkit for plugin authors: everything a plugin may import from robustness-bench
besides the names in `bench` itself. The built-in plugins use only `bench` and `bench.toolkit`
(a test enforces it), so they are examples a third party can copy; every other module of the
core may change without notice.

`API_VERSION` grows by one whenever a name here changes incompatibly; a plugin that depends on
the toolkit can state what it was written for with `bench.toolkit.require_api(2)`, which fails
with a clear message on an incompatible robustness-bench.

What is here:
- data: `cache_dir`, `channel_stats`, `save_arrays_atomically`, `record_written` (for dataset
  plugins: a cache entry written otherwise, e.g. an extracted folder, is recorded so that
  `bench cache clear --datasets` may remove it);
- training: `train_classifier`, `random_crop_flip`, `epoch_order`, `steps_per_epoch`,
  `reference_lr_factor`, `cosine_lr_factor`, `REFERENCE_SAMPLES_PER_EPOCH` (the MCR reference's
  epoch);
- prediction: `to_model_input`, `predict`, `clean_accuracy`, `is_stochastic`, `eval_mode`,
  `STOCHASTIC_PROBE_IMAGES`, `accuracy`;
- attacks: `check_target_class`, `backdoor_success_rate`, `backdoor_robust_accuracy` (ASR and
  RA of a triggered test set); the evasion primitives `pgd_attack` (PGD/FGSM, CE or DLR `Loss`,
  `Norm`, EOT), `dlr_loss`, `robust_accuracy` (per-image `PassCounts` of an attack, a
  `PerturbFn`), `worst_case`, `attack_success_rate`. The built-in attack families build on
  these in plugin modules a third party may subclass: `bench_plugins.attacks.trigger_backdoor`
  (`TriggerBackdoor`, `CleanLabelBackdoor`, `TargetModes`) and
  `bench_plugins.attacks.evasion_protocol` (`EvasionAttack`, `ProtocolOptions`, the masking checks);
- models: `Classifier` (a network behind a fixed normalisation, taking images in [0, 1]: the
  form every model has; for a plugin that builds a network of its own), `GridAvgPool`;
- plugins using plugins: `build_plugin` (an installed plugin by kind, name and options, validated
  like a suite table), `layer_names` (a model's submodule names, for hooks);
- errors and seeds: `did_you_mean`, `derived_seed`;
- statistics: `t_interval`, `equivalence_test` (TOST), `detrended_correlation`,
  `permutation_p_value`, `wilson_interval` (the rules the built-in analyses' findings use).
"""

from bench.adversarial import (
    Loss,
    Norm,
    PassCounts,
    PerturbFn,
    attack_success_rate,
    dlr_loss,
    pgd_attack,
    robust_accuracy,
    worst_case,
)
from bench.attacks import check_target_class
from bench.context import derived_seed
from bench.artifact_cache import cache_dir, save_arrays_atomically
from bench.locations import record_written
from bench.data import channel_stats
from bench.errors import BenchError, did_you_mean
from bench.evaluation import STOCHASTIC_PROBE_IMAGES, clean_accuracy, eval_mode, is_stochastic, predict, to_model_input
from bench.metrics import accuracy, backdoor_robust_accuracy, backdoor_success_rate
from bench.models import Classifier, GridAvgPool
from bench.statistics import (
    detrended_correlation,
    equivalence_test,
    permutation_p_value,
    t_interval,
    wilson_interval,
)
from bench.training import (
    REFERENCE_SAMPLES_PER_EPOCH,
    cosine_lr_factor,
    epoch_order,
    random_crop_flip,
    reference_lr_factor,
    steps_per_epoch,
    train_classifier,
)

API_VERSION = 2  # 2: the backdoor and evasion bases moved to bench_plugins.attacks


def require_api(oldest: int, newest: int | None = None) -> None:
    """Fail with a clear message unless this robustness-bench provides a toolkit API version the
    plugin works with: `oldest` alone means exactly that version; `newest` widens it to the
    range oldest..newest (a plugin tested against several versions says so)."""
    newest = oldest if newest is None else newest
    if not oldest <= API_VERSION <= newest:
        wanted = f"version {oldest}" if oldest == newest else f"a version from {oldest} to {newest}"
        raise BenchError(
            f"this plugin needs bench.toolkit API {wanted}; the installed robustness-bench "
            f"provides version {API_VERSION}"
        )


__all__ = [
    "API_VERSION",
    "Classifier",
    "GridAvgPool",
    "Norm",
    "Loss",
    "PassCounts",
    "PerturbFn",
    "REFERENCE_SAMPLES_PER_EPOCH",
    "STOCHASTIC_PROBE_IMAGES",
    "accuracy",
    "attack_success_rate",
    "build_plugin",
    "cache_dir",
    "channel_stats",
    "record_written",
    "clean_accuracy",
    "cosine_lr_factor",
    "derived_seed",
    "detrended_correlation",
    "equivalence_test",
    "permutation_p_value",
    "t_interval",
    "wilson_interval",
    "did_you_mean",
    "epoch_order",
    "eval_mode",
    "backdoor_robust_accuracy",
    "backdoor_success_rate",
    "check_target_class",
    "dlr_loss",
    "worst_case",
    "is_stochastic",
    "layer_names",
    "pgd_attack",
    "predict",
    "random_crop_flip",
    "reference_lr_factor",
    "require_api",
    "robust_accuracy",
    "save_arrays_atomically",
    "steps_per_epoch",
    "to_model_input",
    "train_classifier",
]


def build_plugin(kind: str, name: str, **options):
    """An instance of the installed plugin `name` of `kind` ("attack", "defense", "dataset",
    "model", "analysis"), with `options` validated as a suite table's would be (a typo or a
    wrong type is a `BenchError` naming it). For a plugin that uses another, e.g. a defense
    that runs an attack on its own model: `build_plugin("attack", "<attack name>", eps=0.03)`."""
    from bench.expansion import plugin_specs
    from bench.registry import load_plugins

    (spec,) = plugin_specs({"name": name, **options}, kind, f"build_plugin({kind!r}, {name!r})", load_plugins())
    return spec.instantiate()


def layer_names(model) -> list[tuple[str, str]]:
    """(name, module type) of every submodule of `model`, in registration order: the names to
    pass to `model.get_submodule(name)` or to hang a forward hook on. The core wraps a model
    plugin's network as `net` (images in [0, 1] are normalised first), so built-in layers are
    `net.<index or name>`."""
    return [(name, type(module).__name__) for name, module in model.named_modules() if name]
