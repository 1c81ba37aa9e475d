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
from bench.adversarial import EvasionAttack, EvasionSettings, Norm, ProtocolOptions

class PGD(EvasionAttack):
    name = "pgd"
    description = "PGD evasion attack (L-inf or L2), EOT-PGD for stochastic models, gradient-masking flag"

    @dataclass(frozen=True)
    class Options(ProtocolOptions):
        norm: Norm = bench.option(Norm.LINF, "threat model: 'linf' or 'l2' (for L2 try eps 0.5, step 0.1)")
        eps: float = bench.option(8 / 255, "perturbation budget on images in [0, 1]", min=0, max=1)
        step: float = bench.option(2 / 255, "step size of each iteration", min=0, min_exclusive=True)
        steps: int = bench.option(10, "iterations per restart", min=1)
        restarts: int = bench.option(1, "random restarts; an image counts as fooled if any restart fools it", min=1)
        random_start: bool = bench.option(True, "start from a uniform random point in the eps-ball")
        check_steps_factor: int = bench.option(5, "deterministic models: the check's steps, as a multiple", min=1)

    def settings(self) -> EvasionSettings:
        o = self.options
        return self.protocol_settings(step=o.step, steps=o.steps, restarts=o.restarts, random_start=o.random_start)


@bench.hookimpl
def register_attacks(register):
    register(PGD)
