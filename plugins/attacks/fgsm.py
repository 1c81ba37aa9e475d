"""`fgsm`: the fast gradient sign method (Goodfellow et al. 2015), PGD's one-step case.

One step of size `eps` along the gradient's sign (L-inf) or its normalized direction (L2),
from the clean image or, with `random_start`, from a random point in the ball (then
projected back). It runs through the same core function and protocol as `pgd`
(`bench_plugins.attacks.evasion_protocol.evaluate_evasion`; see the pgd plugin), so it reports the same metrics:
EOT-FGSM for stochastic models (declared, or detected by two differing forward passes), and
the masking check on the first `check_subset` images, where CE-PGD and DLR-PGD take
`check_steps_factor` steps (10 by default) with restarts, and Square runs when torchattacks is
installed. The headline `robust_acc` and `asr` are the per-image worst case over FGSM and the
checks, so they are PGD-grade numbers on the check images; `robust_acc_attack` is FGSM's own.
FGSM is weaker than PGD on most models, so the `unreliable` flag often fires: it then says
that FGSM's own number overstates robustness (a large gap also points at gradient masking,
e.g. catastrophic overfitting in FGSM-trained models); report `pgd` for robustness claims.
"""

from __future__ import annotations

from dataclasses import dataclass

import bench
from bench.toolkit import Norm
from bench_plugins.attacks.evasion_protocol import EvasionAttack, EvasionSettings, ProtocolOptions


class FGSM(EvasionAttack):
    name = "fgsm"
    description = "FGSM: one-step evasion attack (L-inf or L2), with the pgd plugin's protocol and checks"
    paper = "https://arxiv.org/abs/1412.6572"

    @dataclass(frozen=True)
    class Options(ProtocolOptions):
        norm: Norm = bench.option(Norm.LINF, "threat model: 'linf' or 'l2'")
        eps: float = bench.option(8 / 255, "perturbation budget (and step size) on images in [0, 1]", min=0, max=1)
        random_start: bool = bench.option(False, "step from a uniform random point in the eps-ball (R+FGSM)")
        check_steps_factor: int = bench.option(10, "masking check: steps of its CE-PGD and DLR-PGD", min=1)

    def settings(self) -> EvasionSettings:
        return self.protocol_settings(
            step=self.options.eps, steps=1, restarts=1, random_start=self.options.random_start
        )


@bench.hookimpl
def register_attacks(register):
    register(FGSM)
