"""`autoattack`: AutoAttack (Croce & Hein 2020), the RobustBench protocol, run through the
maintained `torchattacks` package rather than a re-write.

- `standard` (RobustBench's leaderboard set): APGD-CE, APGD-T, FAB-T and Square, each run on
  the images the previous ones left correctly classified;
- `rand` (for stochastic models): APGD-CE and APGD-DLR with EOT over 20 samples;
- `auto` (default): `rand` for a stochastic model, else `standard`. A model is stochastic when
  it declares `stochastic = True` (e.g. SAP) or when two forward passes on the first evaluation
  images differ (`bench.evaluation.is_stochastic`), so a third-party randomized defense gets
  `rand` without declaring anything.

torchattacks' own defaults are lighter than the reference (10 iterations, every other class as
a target, Square's square-size schedule rescaled to its query budget); the plugin sets the
reference budget: 100 iterations for APGD, APGD-T and FAB, at most 9 target classes, 5,000
Square queries, and Square without the rescaled schedule (`resc_schedule=False`, as the
reference AutoAttack and RobustBench run it).

Counting: every adversarial image is predicted once for a deterministic model; for a
stochastic one `passes` times (as the `pgd` plugin does), `robust_acc` being the mean over
passes. `asr` is, of the images classified correctly in every clean pass, the share of passes
in which the adversarial image is misclassified.

The plugin reaches into torchattacks' internals (`AutoAttack._autoattack.attacks` and the
members' attribute names), so it supports the torchattacks releases in
`bench_plugins.attacks.evasion_protocol.TORCHATTACKS_REQUIREMENT` (3.5.x) only: a missing package or another
version stops a suite before it runs (and `build` at run time) with a `bench.BenchError`.

ART's `AutoAttack` runs a different default set, so it is not used. The attacks run in float32
(torchattacks does not autocast) on the model's device, in batches of the suite's
`eval_batch_size`; robust accuracy is counted on the device and read once. Which attacks ran is
recorded with every result and printed under the leaderboard table.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

import bench
from bench.toolkit import Norm, attack_success_rate, eval_mode, is_stochastic, robust_accuracy
from bench_plugins.attacks.evasion_protocol import import_torchattacks
from bench.toolkit import derived_seed
from bench.toolkit import STOCHASTIC_PROBE_IMAGES, to_model_input

STANDARD_ITERATIONS = 100  # APGD, APGD-T and FAB in Croce & Hein's reference code
STANDARD_SQUARE_QUERIES = 5000
STANDARD_TARGET_CLASSES = 9  # APGD-T and FAB-T target the 9 most likely other classes
ATTACKS_RUN = {
    "standard": "APGD-CE, APGD-T, FAB-T, Square without resc_schedule",
    "rand": "APGD-CE and APGD-DLR with EOT-20",
}
NEEDED_BY = "attack 'autoattack'"


class Version(enum.Enum):
    AUTO = "auto"
    STANDARD = "standard"
    RAND = "rand"


class AutoAttack(bench.Attack):
    name = "autoattack"
    description = "AutoAttack (APGD-CE, APGD-T, FAB-T, Square; the RobustBench protocol) via torchattacks"
    paper = "https://arxiv.org/abs/2003.01690"
    code = "https://github.com/fra31/auto-attack"
    stage = bench.Stage.TEST_TIME
    metrics = (
        bench.Metric(
            "robust_acc", "Robust acc", higher_is_better=True, doc="robust accuracy under AutoAttack", headline=True
        ),
        bench.Metric("asr", "ASR", higher_is_better=False, doc="attack success rate under AutoAttack"),
        bench.Metric(
            "rand_version", "Rand version ran", higher_is_better=None, kind=bench.MetricKind.NUMBER, diagnostic=True
        ),
    )
    success_metric = "asr"

    @dataclass(frozen=True)
    class Options:
        norm: Norm = bench.option(Norm.LINF, "threat model: 'linf' or 'l2'")
        eps: float = bench.option(8 / 255, "perturbation budget on images in [0, 1]", min=0, max=1)
        version: Version = bench.option(
            Version.AUTO,
            "'standard', 'rand' (stochastic models), or 'auto' to choose by testing the model for randomness",
        )
        subset: int = bench.option(
            1000, "attack the first N evaluation images; 0: all (RobustBench uses 10,000)", min=0
        )
        iterations: int = bench.option(
            STANDARD_ITERATIONS,
            "iterations of APGD, APGD-T and FAB (100 in the "
            "standard protocol; lower only for smoke tests, the protocol line says so)",
            min=1,
        )
        square_queries: int = bench.option(
            STANDARD_SQUARE_QUERIES,
            "Square's query budget (5,000 in the standard "
            "protocol; lower only for smoke tests, the protocol line says so)",
            min=1,
        )
        passes: int = bench.option(
            10,
            "stochastic models: forward passes each adversarial image is predicted in "
            "(accuracy is the mean, as in pgd)",
            min=1,
        )

    def _version(self, model, sample: torch.Tensor | None = None) -> str:
        """The version to run on `model`: the chosen one, or for `auto` `rand` when the model is
        stochastic (declared, or two passes on `sample` differ) and `standard` otherwise."""
        if self.options.version is Version.AUTO:
            return "rand" if is_stochastic(model, sample) else "standard"
        return self.options.version.value

    def check_dataset(self, splits) -> None:
        import_torchattacks(NEEDED_BY)  # before anything runs, not when the first job reaches the attack

    def describe_protocol(self) -> str:
        torchattacks = import_torchattacks(NEEDED_BY)
        o = self.options
        version = o.version.value  # what `auto` chose for each model is the metric `rand_version`
        runs = {
            "auto": f"standard ({ATTACKS_RUN['standard']}) or, for stochastic models (declared or detected), "
            f"rand ({ATTACKS_RUN['rand']})",
            "standard": f"standard ({ATTACKS_RUN['standard']})",
            "rand": f"rand ({ATTACKS_RUN['rand']})",
        }[version]
        images = f"the first {o.subset}" if o.subset else "all"
        changes = []
        if o.iterations != STANDARD_ITERATIONS:
            changes.append(f"{o.iterations} iterations instead of {STANDARD_ITERATIONS}")
        if o.square_queries != STANDARD_SQUARE_QUERIES and version != "rand":
            changes.append(f"Square cut to {o.square_queries} queries")
        deviation = f"; NOT the standard budget: {', '.join(changes)}" if changes else ""
        counting = "" if version == "standard" else f"; stochastic models predicted {o.passes} times per image"
        return (
            f"AutoAttack {runs}, {o.iterations} iterations, at most {STANDARD_TARGET_CLASSES} target classes, "
            f"torchattacks {torchattacks.__version__}, {o.norm.value} eps {o.eps:.4g}, on {images} "
            f"evaluation images{counting}{deviation}"
        )

    def build(self, model, num_classes: int, seed: int, sample: torch.Tensor | None = None):
        """torchattacks' AutoAttack with the reference budget: torchattacks defaults APGD, APGD-T
        and FAB to 10 iterations, targets every other class and rescales Square's schedule; the
        reference runs 100 iterations, at most 9 target classes and Square's fixed schedule.
        Returns the attack and the version it runs (`sample`: images to test the model's
        randomness on, for `auto`)."""
        torchattacks = import_torchattacks(NEEDED_BY)
        o = self.options
        version = self._version(model, sample)
        attack = torchattacks.AutoAttack(
            model,
            norm="Linf" if o.norm is Norm.LINF else "L2",
            eps=o.eps,
            version=version,
            n_classes=num_classes,
            seed=seed,
        )
        for member in attack._autoattack.attacks:
            if isinstance(member, torchattacks.Square):
                member.n_queries = o.square_queries
                member.rescale_schedule = False  # the `resc_schedule` constructor argument
            else:  # APGD, APGDT, FAB
                member.steps = o.iterations
            if hasattr(member, "n_target_classes"):
                member.n_target_classes = min(STANDARD_TARGET_CLASSES, num_classes - 1)
        return attack, version

    def evaluate(self, model, test, ctx, state):
        o = self.options
        count = len(test) if o.subset == 0 else min(o.subset, len(test))
        images, labels = test.x[:count], test.y[:count]
        sample = to_model_input(images[:STOCHASTIC_PROBE_IMAGES])
        passes = o.passes if is_stochastic(model, sample) else 1
        attack, version = self.build(model, ctx.num_classes, derived_seed(ctx.seed, "autoattack") % 2**31, sample)
        progress = lambda it: ctx.progress(it, desc="autoattack")  # noqa: E731
        # Predictions in float32, as the attacks ran; contiguous inputs, since FAB reshapes with
        # .view(), which channels_last tensors (CUDA) refuse.
        with eval_mode(model):
            clean = robust_accuracy(model, images, labels, attack=None, passes=passes, batch_size=ctx.eval_batch_size)
            robust = robust_accuracy(
                model,
                images,
                labels,
                attack=lambda x, y: attack(x.contiguous(), y),
                passes=passes,
                batch_size=ctx.eval_batch_size,
                progress=progress,
            )
        numbers = torch.stack([robust.accuracy(), attack_success_rate(clean, robust, targeted=False)]).tolist()
        return {"robust_acc": numbers[0], "asr": numbers[1], "rand_version": float(version == "rand")}


@bench.hookimpl
def register_attacks(register):
    register(AutoAttack)
