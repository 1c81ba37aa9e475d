"""`pgd`: projected gradient descent (Madry et al. 2018), L-inf or L2, untargeted or targeted,
with random restarts, and with EOT for stochastic models.

The protocol, on the first `subset` evaluation images (0: all; the default 1,000 keeps CPU
runs short, set 0 for a full evaluation):

- `robust_acc`: accuracy on PGD examples built with one-sample gradients. A stochastic model
  (`model.stochastic` true, e.g. SAP) predicts each adversarial image `passes` times and the
  accuracy is the mean over passes.
- A stochastic model is also attacked with EOT-PGD (gradients summed over `eot_samples` draws
  per step): `robust_acc_eot` (mean over passes) and `robust_acc_eot_all` (correct in all
  passes). For a deterministic model EOT changes nothing, so these equal `robust_acc`.
- `clean_acc_all_passes`: the subset's clean images classified correctly in every pass.
- `asr`: of the images classified correctly in every clean pass, the share the strongest
  attack run (EOT-PGD for stochastic models, PGD otherwise) moves off their label (untargeted)
  or onto the target (targeted), averaged over passes. It is the `success_metric` for DER.
- Gradient masking check (AutoAttack/RobustBench's "unreliable" flag): `masking_gap` is how
  much higher plain PGD's robust accuracy is than that of a stronger attack on the same images,
  EOT-PGD for stochastic models, or for deterministic ones PGD with `check_steps_factor` times
  the steps (step 2.5 eps / steps), random start and `check_restarts` restarts on the first
  `check_subset` images (per image the worse of both attacks counts). `unreliable` is 1.0
  when the gap exceeds `masking_threshold`.

Targeted attacks aim for `target_class` (then images of that class are left out), or with
`target_class` -1 for (label + 1) mod classes. ART's `ProjectedGradientDescentPyTorch` is not
used: it round-trips every batch through NumPy on the host (REFERENCE.md section 7); the test
suite checks that both agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import bench
from bench.adversarial import EVASION_METRICS, EvasionSettings, Norm, check_target, evaluate_evasion

class PGD(bench.Attack):
    name = "pgd"
    description = "PGD evasion attack (L-inf or L2), EOT-PGD for stochastic models, gradient-masking flag"
    stage = bench.Stage.TEST_TIME
    metrics = EVASION_METRICS
    success_metric = "asr"

    @dataclass(frozen=True)
    class Options:
        norm: Norm = bench.option(Norm.LINF, "threat model: 'linf' or 'l2' (for L2 try eps 0.5, step 0.1)")
        eps: float = bench.option(8 / 255, "perturbation budget on images in [0, 1]", min=0, max=1)
        step: float = bench.option(2 / 255, "step size of each iteration", min=0, min_exclusive=True)
        steps: int = bench.option(10, "iterations per restart", min=1)
        restarts: int = bench.option(1, "random restarts; an image counts as fooled if any restart fools it", min=1)
        random_start: bool = bench.option(True, "start from a uniform random point in the eps-ball")
        targeted: bool = bench.option(False, "aim for a target class instead of any wrong class")
        target_class: int = bench.option(-1, "target of targeted attacks; -1: (label + 1) mod classes", min=-1)
        subset: int = bench.option(1000, "attack the first N evaluation images; 0: all of them", min=0)
        eot_samples: int = bench.option(10, "stochastic models: gradient samples averaged per EOT step", min=1)
        passes: int = bench.option(10, "stochastic models: forward passes each image is predicted in", min=1)
        masking_threshold: float = bench.option(
            0.05, "flag 'unreliable' when plain PGD's robust accuracy exceeds the stronger attack's by more",
            min=0, max=1)
        check_subset: int = bench.option(200, "deterministic models: images the stronger check attacks", min=1)
        check_steps_factor: int = bench.option(5, "deterministic models: the check's steps, as a multiple", min=1)
        check_restarts: int = bench.option(3, "deterministic models: the check's random restarts", min=1)

    def settings(self) -> EvasionSettings:
        o = self.options
        return EvasionSettings(
            norm=o.norm, eps=o.eps, step=o.step, steps=o.steps, restarts=o.restarts, random_start=o.random_start,
            targeted=o.targeted, target_class=o.target_class, subset=o.subset, eot_samples=o.eot_samples,
            passes=o.passes, masking_threshold=o.masking_threshold, check_subset=o.check_subset,
            check_steps_factor=o.check_steps_factor, check_restarts=o.check_restarts)

    def check_dataset(self, splits):
        check_target(self.name, self.options.target_class, splits.num_classes)

    def evaluate(self, model, test, ctx, state):
        check_target(self.name, self.options.target_class, ctx.num_classes)
        return evaluate_evasion(model, test, ctx, self.settings(), stream=self.name)


@bench.hookimpl
def register_attacks(register):
    register(PGD)
