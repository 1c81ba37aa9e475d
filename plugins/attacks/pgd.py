"""`pgd`: projected gradient descent (Madry et al. 2018), L-inf or L2, untargeted or targeted,
with random restarts, EOT for stochastic models, and a gradient-masking check.

The protocol (`bench_plugins.attacks.evasion_protocol.evaluate_evasion`), on the first `subset` evaluation images
(0: all; the default 1,000 keeps CPU runs short, set 0 for a full evaluation; a targeted
attack with a fixed `target_class` leaves out the images of that class):

- Stochastic models: a model is stochastic when it declares `stochastic = True` (e.g. SAP) or
  when two forward passes on the same images differ (`bench.evaluation.is_stochastic`, eval
  mode, no gradients), so a third-party randomized defense is attacked with EOT without
  declaring anything. Every adversarial (and clean) image is then predicted `passes` times and
  accuracies are means over passes; a deterministic model is predicted once.
- Attacks run, and which images each saw:
  - the configured attack with one-sample gradients, on every image (`robust_acc_attack`);
  - stochastic models only: the same attack with EOT, gradients summed over `eot_samples`
    draws per step, on every image (`robust_acc_eot`, mean over passes; `robust_acc_eot_all`,
    correct in all passes). For a deterministic model EOT is the same attack, so these equal
    `robust_acc_attack` (and "all passes" is the one pass);
  - the gradient-masking checks, on the first `check_subset` images only: CE-PGD and DLR-PGD
    (`robust_acc_check_ce`, `robust_acc_check_dlr`) with `check_steps_factor` times the
    steps, step 2.5 eps / steps, random start and `check_restarts` restarts, with EOT over
    `eot_samples` draws for stochastic models; and the gradient-free Square attack with
    `check_square_queries` queries (`robust_acc_check_square`; torchattacks' Square as
    RobustBench runs it, margin loss, `resc_schedule=False`). DLR (Croce & Hein 2020) is
    invariant to scaling the logits, so a model whose logits are multiplied by 1e4 (same
    decisions, saturated cross-entropy gradients) cannot hide from it; Square needs no
    gradient at all, so an input quantizer with zero gradient cannot hide from it. With fewer
    than 3 classes (4 targeted) DLR falls back to the CW margin. The check accuracies are on
    the check images only.
- Headline, as AutoAttack counts: `robust_acc` is, per image, the worst case over every attack
  (the fewest correct passes), averaged over the first `check_subset` images, the ones every
  attack ran on (`headline_images`): one protocol per number. The configured attack's own
  accuracy on the whole subset is `robust_acc_attack`. For a
  stochastic model the counts are noisy, so the per-image minimum over several attacks is also
  lowered by chance (less so with more `passes`): the conservative direction, as in
  AutoAttack's `rand` version, which counts one pass per attack.
- `asr` (the success metric, used for DER): of the images classified correctly in every clean
  pass, the share of passes in which the worst-case adversarial image is misclassified
  (untargeted) or classified as the target (targeted; per image the most target hits of any
  attack).
- `masking_gap`: the largest amount by which a check's success rate (misclassified share, or
  target hits when targeted) exceeds that of the configured attack (per image the worse of
  its one-sample and EOT variants) on the check images; 0 when no check does better.
  `unreliable` (a flag shown as "⚠ unreliable", as RobustBench marks potentially unreliable
  evaluations) is 1 when the gap exceeds `masking_threshold`: the configured attack was beaten,
  a sign of gradient masking (or of too small a budget), even though the headline already
  counts the check's examples.
- `clean_acc_one_pass`: clean accuracy of single passes (mean over `passes` for a stochastic
  model), and `clean_acc_all_passes`: clean images correct in every pass. The job's `clean_acc`
  (`bench.evaluation.clean_accuracy`) counts a stochastic model's averaged prediction instead:
  the argmax of its softmax averaged over `CLEAN_ACCURACY_PASSES` (10) passes.
- `stochastic`: 1 when the model was judged stochastic.

The per-attack numbers, the gap, the clean diagnostics and `stochastic` are diagnostic metrics
(the leaderboard's second table); `robust_acc`, `asr` and `unreliable` are the headline.
Without torchattacks (`pip install 'robustness-bench[autoattack]'`), or with a version
outside `bench_plugins.attacks.evasion_protocol.TORCHATTACKS_REQUIREMENT`, Square does not run, and
`robust_acc_check_square` is absent: the protocol line under the leaderboard table, written
when the job runs, then says "NO Square check" and why. `check_square_queries = 0` turns
Square off the same visible way.

Targeted attacks aim for `target_class` (then images of that class are left out), or with
`target_class` -1 for (label + 1) mod classes; the checks are then targeted too. ART's
`ProjectedGradientDescentPyTorch` is not used: it round-trips every batch through NumPy on the
host (REFERENCE.md section 7); the test suite checks that both agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import bench
from bench.toolkit import Norm
from bench_plugins.attacks.evasion_protocol import EvasionAttack, EvasionSettings, ProtocolOptions


class PGD(EvasionAttack):
    name = "pgd"
    description = (
        "PGD evasion (L-inf or L2, EOT for stochastic models); worst case with CE/DLR-PGD and Square masking checks"
    )
    paper = "https://arxiv.org/abs/1706.06083"

    @dataclass(frozen=True)
    class Options(ProtocolOptions):
        norm: Norm = bench.option(Norm.LINF, "threat model: 'linf' or 'l2' (for L2 try eps 0.5, step 0.1)")
        eps: float = bench.option(8 / 255, "perturbation budget on images in [0, 1]", min=0, max=1)
        step: float = bench.option(2 / 255, "step size of each iteration", min=0, min_exclusive=True)
        steps: int = bench.option(10, "iterations per restart", min=1)
        restarts: int = bench.option(1, "random restarts; an image counts as fooled if any restart fools it", min=1)
        random_start: bool = bench.option(True, "start from a uniform random point in the eps-ball")
        check_steps_factor: int = bench.option(
            5, "masking check: steps of its CE-PGD and DLR-PGD, as a multiple of steps", min=1
        )

    def settings(self) -> EvasionSettings:
        o = self.options
        return self.protocol_settings(step=o.step, steps=o.steps, restarts=o.restarts, random_start=o.random_start)


@bench.hookimpl
def register_attacks(register):
    register(PGD)
