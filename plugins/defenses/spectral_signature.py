"""`spectral_signature`: Spectral Signatures (Tran, Li & Madry, NeurIPS 2018), through the
Adversarial Robustness Toolbox (ART, `art.defences.detector.poison.SpectralSignatureDefense`).

Poisoned images leave a trace in the covariance of a backdoored model's learned
representation: projected on the top singular vector of a class's centred representations,
they score higher than the clean images. Step by step:

1. train the freshly initialised model on the poisoned training set with the model family's
   recipe, as the attacker's training would (`epochs`, 0: the recipe's);
2. run ART's `SpectralSignatureDefense` on the training set with that model: per class (the
   labels as poisoned), each image's score is the magnitude of its last-hidden-layer
   representation's projection on the top right singular vector of the class's centred
   representations, and the images above the class's (1 - `eps_multiplier` x
   `expected_pp_poison`) quantile are flagged;
3. remove the flagged images and train the untrained model again (the very initialisation it
   came with) on the rest; return it with the removed indices, which the core scores as
   detection TPR, FPR and precision against the poisoned images.

Defaults are ART 1.20's own (`SpectralSignatureDefense.__init__`): `expected_pp_poison` 0.33
and `eps_multiplier` 1.5, i.e. the top 49.5% of every class, clean classes included, is removed
(the paper removes 1.5 times an upper bound on the poisoned images of a class;
BackdoorBench's `spectral` removes the top 15% of the attack's target class only, which a
defender does not know). Lower `expected_pp_poison` to remove less.

ART reads the last entry of `PyTorchClassifier.layer_names`, the logits for our models, not
the representation the paper uses; as for `activation_clustering` (whose module has the glue),
ART gets a copy of the model whose classification head is replaced by `nn.Identity`, so what it
reads is the last hidden layer. `pip install 'robustness-bench[art]'` installs ART; it is
imported only when the defense runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import bench
from bench_plugins.defenses.activation_clustering import classification_head, filter_and_retrain


class SpectralSignature(bench.Defense):
    name = "spectral_signature"
    description = "Spectral Signatures (ART): remove each class's top outlier scores, retrain"
    paper = "https://arxiv.org/abs/1811.00636"
    code = "https://github.com/Trusted-AI/adversarial-robustness-toolbox"
    defender_data = bench.DefenderData.POISONED_TRAINING_SET

    @dataclass(frozen=True)
    class Options:
        epochs: int = bench.option(
            0, "epochs of each training (on the poisoned set, then on the rest); 0: the model's recipe", min=0
        )
        expected_pp_poison: float = bench.option(
            0.33, "expected share of poisoned images in a class (ART's default)", min=0, max=1
        )
        eps_multiplier: float = bench.option(
            1.5, "the share removed per class is eps_multiplier x expected_pp_poison (ART's default)", min=0
        )

        def __post_init__(self):
            if self.eps_multiplier * self.expected_pp_poison >= 1:
                raise ValueError(
                    f"eps_multiplier {self.eps_multiplier} x expected_pp_poison {self.expected_pp_poison} removes "
                    "every image of every class; their product must be below 1"
                )

    def check_model(self, model, sample):
        classification_head(model, sample, self.name)

    def apply(self, model, train, ctx):
        o = self.options

        def detect(classifier, x, y) -> list[int]:
            from art.defences.detector.poison import SpectralSignatureDefense

            defence = SpectralSignatureDefense(
                classifier, x, y, expected_pp_poison=o.expected_pp_poison, eps_multiplier=o.eps_multiplier
            )
            _, is_clean = defence.detect_poison()
            return is_clean

        return filter_and_retrain(model, train, ctx, o.epochs, self.name, detect)


@bench.hookimpl
def register_defenses(register):
    register(SpectralSignature)
