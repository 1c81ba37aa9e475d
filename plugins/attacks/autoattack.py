"""`autoattack`: AutoAttack (Croce & Hein 2020), the RobustBench protocol, run through the
maintained `torchattacks` package rather than a re-write.

- `standard` (RobustBench's leaderboard set): APGD-CE, APGD-T, FAB-T and Square, each run on
  the images the previous ones left correctly classified;
- `rand` (for stochastic models): APGD-CE and APGD-DLR with EOT over 20 samples;
- `auto` (default): `rand` for a model with `stochastic = True` (e.g. SAP), else `standard`.

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
from bench.adversarial import Norm, is_stochastic
from bench.context import derived_seed
from bench.evaluation import to_model_input

ATTACKS_RUN = {"standard": "APGD-CE, APGD-T, FAB-T, Square", "rand": "APGD-CE and APGD-DLR with EOT-20"}


class Version(enum.Enum):
    AUTO = "auto"
    STANDARD = "standard"
    RAND = "rand"


class AutoAttack(bench.Attack):
    name = "autoattack"
    description = "AutoAttack (APGD-CE, APGD-T, FAB-T, Square; the RobustBench protocol) via torchattacks"
    stage = bench.Stage.TEST_TIME
    metrics = (bench.Metric("robust_acc", "Robust acc", higher_is_better=True),
               bench.Metric("asr", "ASR", higher_is_better=False))
    success_metric = "asr"

    @dataclass(frozen=True)
    class Options:
        norm: Norm = bench.option(Norm.LINF, "threat model: 'linf' or 'l2'")
        eps: float = bench.option(8 / 255, "perturbation budget on images in [0, 1]", min=0, max=1)
        version: Version = bench.option(Version.AUTO, "'standard', 'rand' (stochastic models), or 'auto' to choose")
        subset: int = bench.option(1000, "attack the first N evaluation images; 0: all (RobustBench uses 10,000)",
                                   min=0)
        square_queries: int = bench.option(5000, "Square's query budget (5,000 in the standard protocol; lower "
                                                 "only for smoke tests, the protocol line records it)", min=1)

    def _version(self, model) -> str:
        if self.options.version is Version.AUTO:
            return "rand" if is_stochastic(model) else "standard"
        return self.options.version.value

    def describe_protocol(self) -> str:
        o = self.options
        import torchattacks
        versions = {"auto": "standard (APGD-CE, APGD-T, FAB-T, Square), or rand (APGD-CE and APGD-DLR with "
                            "EOT-20) for stochastic models",
                    "standard": "standard (" + ATTACKS_RUN["standard"] + ")", "rand": "rand (" + ATTACKS_RUN["rand"] + ")"}
        images = f"the first {o.subset}" if o.subset else "all"
        queries = "" if o.square_queries == 5000 else f", Square cut to {o.square_queries} queries (not the standard)"
        return (f"AutoAttack {versions[o.version.value]}, torchattacks {torchattacks.__version__}, "
                f"{o.norm.value} eps {o.eps:.4g}, on {images} evaluation images{queries}")

    def evaluate(self, model, test, ctx, state):
        import torchattacks

        o = self.options
        count = len(test) if o.subset == 0 else min(o.subset, len(test))
        version = self._version(model)
        attack = torchattacks.AutoAttack(model, norm="Linf" if o.norm is Norm.LINF else "L2", eps=o.eps,
                                         version=version, n_classes=ctx.num_classes,
                                         seed=derived_seed(ctx.seed, "autoattack") % 2 ** 31)
        for member in attack._autoattack.attacks:  # torchattacks fixes Square's budget at 5,000
            if isinstance(member, torchattacks.Square):
                member.n_queries = o.square_queries
        was_training = model.training
        model.eval()
        robust = torch.zeros((), device=ctx.device)
        clean_correct = torch.zeros((), device=ctx.device)
        fooled = torch.zeros((), device=ctx.device)
        for start in ctx.progress(range(0, count, ctx.eval_batch_size), desc="autoattack"):
            x = to_model_input(test.x[start:min(start + ctx.eval_batch_size, count)])
            y = test.y[start:start + len(x)]
            adversarial = attack(x, y)
            with torch.no_grad():
                clean_hit = model(x).argmax(1) == y
                robust_hit = model(adversarial).argmax(1) == y
            robust += robust_hit.sum()
            clean_correct += clean_hit.sum()
            fooled += (clean_hit & ~robust_hit).sum()
        model.train(was_training)
        return {"robust_acc": (robust / max(count, 1)).item(),
                "asr": (fooled / clean_correct.clamp_min(1)).item()}


@bench.hookimpl
def register_attacks(register):
    register(AutoAttack)
