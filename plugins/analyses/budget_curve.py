"""`budget_curve`: robust accuracy against the attack budget, for an undefended model and a
defended one, attacked with plain PGD and with EOT-PGD (Athalye, Carlini & Wagner, ICML 2018).

The verdict on Stochastic Activation Pruning is a curve, not a number: SAP looks robust to
one-sample PGD, and with Expectation over Transformation (gradients averaged over `eot_samples`
stochastic passes per step) its accuracy falls to about 9% at eps 0.015 and 0% at eps 0.031 on
CIFAR-10. Models: `undefended` (the trained model) and `defended` (the `defense` applied to
it, `bonafide_size` test-half images when it uses any). For every eps of `eps` (L-inf, PGD with
`steps` steps of 2.5 eps / steps and a random start) on the first `images` evaluation images:

- the undefended model under PGD;
- the defended model under one-sample PGD (plain) and under EOT-PGD.

Accuracy of a stochastic model is counted over `passes` forward passes of each adversarial
image (correct passes / all passes). Values: at the largest eps, the undefended and the
defended (EOT) accuracy, and the gap between plain and EOT accuracy there (how much a plain
evaluation overstates the defense). Findings (`budget_findings`): whether this run shows the
defense no more robust than the undefended model under EOT (a one-sided equivalence test with a
3-point margin at every eps, Bonferroni-corrected), and plain attacks overstating it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy import stats as scipy_stats

import bench
from bench.toolkit import Norm, is_stochastic, pgd_attack, robust_accuracy, to_model_input


# The rules by which a run "shows" Athalye et al.'s findings (printed with the evidence):
# "no more robust under EOT" is a one-sided equivalence (non-inferiority) claim with a stated
# margin, tested at every attacked eps with a Bonferroni correction; a failure to reject a
# difference is never taken as showing the claim (fewer images would make that easier).
MARGIN = 0.03  # EOT accuracy within 3 points above the undefended model's counts as "no more robust"
LEVEL = 0.05  # family-wise level over the eps tested


def paired_gap(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of a - b over images, for per-image accuracies (correct passes /
    passes) of two attacks on the same images: a paired comparison, so the images' own
    difficulty cancels."""
    difference = (a - b).double()
    return float(difference.mean()), float(difference.std() / len(difference) ** 0.5) if len(difference) > 1 else 0.0


def no_more_robust_p_value(defended: torch.Tensor, undefended: torch.Tensor, margin: float = MARGIN) -> float:
    """One-sided test of H0: the defended model's per-image accuracy is at least `margin` above
    the undefended one's (paired, t distribution): the upper half of a TOST. A small p-value
    shows the defense no more robust than the undefended model, up to the margin."""
    n = len(defended)
    mean, se = paired_gap(defended, undefended)
    if n < 2:
        return 1.0
    if se == 0:
        return 0.0 if mean < margin else 1.0
    return float(scipy_stats.t.cdf((mean - margin) / se, n - 1))


def greater_p_value(a: torch.Tensor, b: torch.Tensor) -> float:
    """One-sided paired t-test of H0: mean(a - b) <= 0."""
    mean, se = paired_gap(a, b)
    if len(a) < 2:
        return 1.0
    if se == 0:
        return 0.0 if mean > 0 else 1.0
    return float(scipy_stats.t.sf(mean / se, len(a) - 1))


def budget_findings(per_image: dict[tuple[float, str], torch.Tensor], defense: str) -> list[bench.Finding]:
    """Athalye et al.'s findings on this run, from per-image accuracies by (eps, attack), tested
    at every eps > 0 with a Bonferroni correction (level `LEVEL` / the number of eps):

    - under EOT the defense is no more robust than the undefended model: at every such eps, the
      one-sided test that its EOT accuracy is at least `MARGIN` above the undefended one's is
      rejected (an equivalence test: with too few images nothing is shown);
    - a plain one-sample attack overstates it: at some eps, plain accuracy is significantly
      above EOT accuracy (one-sided paired t-test)."""
    budgets = sorted({eps for eps, _ in per_image if eps > 0}) or sorted({eps for eps, _ in per_image})
    level = LEVEL / len(budgets)
    images = len(per_image[(budgets[-1], "undefended")])
    no_more = {
        eps: (
            paired_gap(per_image[(eps, "defended, EOT-PGD")], per_image[(eps, "undefended")]),
            no_more_robust_p_value(per_image[(eps, "defended, EOT-PGD")], per_image[(eps, "undefended")]),
        )
        for eps in budgets
    }
    overstated = {
        eps: (
            paired_gap(per_image[(eps, "defended, plain PGD")], per_image[(eps, "defended, EOT-PGD")]),
            greater_p_value(per_image[(eps, "defended, plain PGD")], per_image[(eps, "defended, EOT-PGD")]),
        )
        for eps in budgets
    }

    def described(tests):
        return ", ".join(
            f"{eps:g}: {100 * gap:+.1f} ± {100 * error:.1f} points, p = {p:.2g}"
            for eps, ((gap, error), p) in tests.items()
        )

    return [
        bench.Finding(
            f"Under EOT-PGD, {defense} is no more robust than the undefended model (Athalye et al., ICML 2018, "
            "Table 1 and Section 5.3: SAP at about 9% at eps 0.015 and 0% at 0.031 on CIFAR-10).",
            all(p < level for _, p in no_more.values()),
            f"{images} images; test of 'EOT accuracy at least {100 * MARGIN:g} points above the undefended "
            f"model's' at level {LEVEL:g}/{len(budgets)}, EOT minus undefended by eps: {described(no_more)}",
        ),
        bench.Finding(
            f"A plain one-sample attack overstates {defense}.",
            any(p < level for _, p in overstated.values()),
            f"{images} images; one-sided paired test at level {LEVEL:g}/{len(budgets)}, plain minus EOT accuracy "
            f"by eps: {described(overstated)}",
        ),
    ]


class BudgetCurve(bench.Analysis):
    name = "budget_curve"
    description = "Robust accuracy against the attack budget, undefended vs defended, plain PGD vs EOT-PGD"
    paper = "https://arxiv.org/abs/1802.00420"

    @dataclass(frozen=True)
    class Options:
        defense: str = bench.option("sap", "the defense to trace (its default options)")
        bonafide_size: int = bench.option(
            100, "bonafide images (half of the test set) for a defense that uses them", min=1
        )
        eps: list[float] = bench.option(
            [0.0, 0.008, 0.015, 0.031, 0.063], "L-inf budgets, in [0, 1] pixel units", min=0, max=1
        )
        steps: int = bench.option(20, "PGD steps per attack (step 2.5 eps / steps)", min=1)
        eot_samples: int = bench.option(10, "stochastic passes averaged per EOT gradient", min=2)
        passes: int = bench.option(10, "forward passes counted per adversarial image of a stochastic model", min=1)
        images: int = bench.option(500, "evaluation images (0: all)", min=0)

        def __post_init__(self):
            if not self.eps:
                raise ValueError("eps: give at least one budget")

    metrics = (
        bench.Metric("undefended_acc_max_eps", "Undefended acc. at max eps", True),
        bench.Metric("defended_eot_acc_max_eps", "Defended acc. (EOT) at max eps", True),
        bench.Metric("plain_minus_eot_max_eps", "Plain − EOT at max eps", None, kind=bench.MetricKind.NUMBER),
    )

    def models(self):
        return {
            "undefended": bench.ModelRecipe(),
            "defended": bench.ModelRecipe(defense=self.options.defense, bonafide_size=self.options.bonafide_size),
        }

    def run(self, models, data, ctx):
        o = self.options
        evaluation = data.evaluation
        if o.images:
            evaluation = evaluation.subset(torch.arange(min(o.images, len(evaluation)), device=evaluation.y.device))
        probe = to_model_input(evaluation.x[:8])
        records = []
        per_image: dict[tuple[float, str], torch.Tensor] = {}  # accuracy over passes, by (eps, attack)
        for eps in sorted(set(o.eps)):
            for name, model, eot in (
                ("undefended", models["undefended"], 1),
                ("defended, plain PGD", models["defended"], 1),
                ("defended, EOT-PGD", models["defended"], o.eot_samples),
            ):
                stochastic = is_stochastic(model, probe)
                eot = eot if stochastic else 1  # for a deterministic model EOT-PGD is plain PGD
                generator = ctx.generator(f"budget_{eps}_{name}")

                def attack(x, y, model=model, eot=eot, generator=generator, eps=eps):
                    if eps == 0:
                        return x
                    return pgd_attack(
                        model,
                        x,
                        y,
                        eps=eps,
                        step=2.5 * eps / o.steps,
                        steps=o.steps,
                        norm=Norm.LINF,
                        random_start=True,
                        eot_samples=eot,
                        generator=generator,
                        autocast=ctx.autocast,
                    )

                counts = robust_accuracy(
                    model.eval(),
                    evaluation.x,
                    evaluation.y,
                    attack=attack,
                    passes=o.passes if stochastic else 1,
                    batch_size=ctx.eval_batch_size,
                    autocast=ctx.autocast,
                )
                per_image[(eps, name)] = counts.correct.float().cpu() / counts.passes
                accuracy = float(per_image[(eps, name)].mean())
                records.append({"eps": eps, "attack": name, "robust_acc": accuracy, "stochastic": int(stochastic)})
        top = max(o.eps)
        at_top = {r["attack"]: r["robust_acc"] for r in records if r["eps"] == top}
        values = {
            "undefended_acc_max_eps": at_top["undefended"],
            "defended_eot_acc_max_eps": at_top["defended, EOT-PGD"],
            "plain_minus_eot_max_eps": at_top["defended, plain PGD"] - at_top["defended, EOT-PGD"],
        }
        figures = [
            bench.Figure(
                "curve",
                "eps",
                ("robust_acc",),
                f"robust accuracy against eps ({o.defense})",
                group="attack",
                xlabel="eps (L-inf, pixel units in [0, 1])",
                ylabel="accuracy (%)",
            )
        ]
        findings = budget_findings(per_image, o.defense)
        return bench.AnalysisResult(values=values, series={"curve": records}, figures=figures, findings=findings)


@bench.hookimpl
def register_analyses(register):
    register(BudgetCurve)
