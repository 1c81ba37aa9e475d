"""`fgsm`: the fast gradient sign method (Goodfellow et al. 2015), PGD's one-step case.

One step of size `eps` along the gradient's sign (L-inf) or its normalized direction (L2),
from the clean image or, with `random_start`, from a random point in the ball (then
projected back). It runs through the same core function and protocol as `pgd`
(`bench.adversarial.evaluate_evasion`), so it reports the same metrics: EOT-FGSM for
stochastic models, and the gradient-masking check, where the stronger attack is a
`check_steps_factor`-step PGD with restarts. FGSM is weaker than PGD on most models, so the
flag often fires: it then says that FGSM's number overstates robustness (a large gap also
points at gradient masking, e.g. catastrophic overfitting in FGSM-trained models); report
`pgd` for robustness claims.
"""

from __future__ import annotations

from dataclasses import dataclass

import bench
from bench.adversarial import EVASION_METRICS, EvasionSettings, Norm, check_target, evaluate_evasion


class FGSM(bench.Attack):
    name = "fgsm"
    description = "FGSM: one-step evasion attack (L-inf or L2), with the pgd plugin's protocol and checks"
    stage = bench.Stage.TEST_TIME
    metrics = EVASION_METRICS
    success_metric = "asr"

    @dataclass(frozen=True)
    class Options:
        norm: Norm = bench.option(Norm.LINF, "threat model: 'linf' or 'l2'")
        eps: float = bench.option(8 / 255, "perturbation budget (and step size) on images in [0, 1]", min=0, max=1)
        random_start: bool = bench.option(False, "step from a uniform random point in the eps-ball (R+FGSM)")
        targeted: bool = bench.option(False, "aim for a target class instead of any wrong class")
        target_class: int = bench.option(-1, "target of targeted attacks; -1: (label + 1) mod classes", min=-1)
        subset: int = bench.option(1000, "attack the first N evaluation images; 0: all of them", min=0)
        eot_samples: int = bench.option(10, "stochastic models: gradient samples averaged in the EOT step", min=1)
        passes: int = bench.option(10, "stochastic models: forward passes each image is predicted in", min=1)
        masking_threshold: float = bench.option(
            0.05, "flag 'unreliable' when FGSM's robust accuracy exceeds the stronger attack's by more",
            min=0, max=1)
        check_subset: int = bench.option(200, "deterministic models: images the stronger check attacks", min=1)
        check_steps_factor: int = bench.option(10, "deterministic models: steps of the check PGD", min=1)
        check_restarts: int = bench.option(3, "deterministic models: the check's random restarts", min=1)

    def settings(self) -> EvasionSettings:
        o = self.options
        return EvasionSettings(
            norm=o.norm, eps=o.eps, step=o.eps, steps=1, restarts=1, random_start=o.random_start,
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
    register(FGSM)
