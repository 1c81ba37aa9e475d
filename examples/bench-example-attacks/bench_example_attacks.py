"""Two complete third-party attacks for robustness-bench, one of each kind the core expresses
beyond plain data poisoning. Installed with pip, they are discovered through the
`robustness_bench` entry-point group like the built-ins.

- `clean_label_patch`: a clean-label backdoor. Subclassing `CleanLabelBackdoor` is all it takes:
  only images of the target class get the trigger, their labels stay true, and `poison_rate` is
  a share of the target class (a rate that rounds to no image is refused). The test-time trigger,
  ASR and RA come with the base class.
- `jittered_blend`: an attack that controls training. It poisons no image once and for all;
  instead the core calls `training_batch` on every augmented float batch of the attacked model's
  training, and the attack blends a fixed noise pattern into the first share of the batch at a
  strength drawn per batch, relabelling those images to the target. The core keeps the recipe,
  the schedule, the budget and the cache key (which holds these options and this file).
"""

from dataclasses import dataclass

import torch

import bench
from bench.toolkit import backdoor_robust_accuracy, backdoor_success_rate, check_target_class, predict
from bench_plugins.attacks.trigger_backdoor import CleanLabelBackdoor


class CleanLabelPatch(CleanLabelBackdoor):
    name = "clean_label_patch"
    description = "Clean-label patch: a white square on target-class training images, labels kept"

    @dataclass(frozen=True)
    class Options:
        poison_rate: float = bench.option(0.5, "share of the TARGET CLASS's training images patched", min=0, max=1)
        target_class: int = bench.option(0, "class whose images carry the patch, and the attack's target", min=0)
        size: int = bench.option(3, "side of the square patch in the bottom-right corner, in pixels", min=1)

    def apply_trigger(self, x):
        x = x.clone()
        x[..., -self.options.size :, -self.options.size :] = 255
        return x


class JitteredBlend(bench.Attack):
    name = "jittered_blend"
    description = "Blends a noise pattern at a strength drawn per training batch (the attacker is the trainer)"
    stage = bench.Stage.TRAINING
    controls_training = True
    metrics = (
        bench.Metric("asr", "ASR", higher_is_better=False, doc="attack success rate"),
        bench.Metric("ra", "RA", higher_is_better=True, doc="robust accuracy on triggered inputs"),
    )
    success_metric = "asr"

    @dataclass(frozen=True)
    class Options:
        poison_rate: float = bench.option(0.1, "share of every training batch blended and relabelled", min=0, max=1)
        target_class: int = bench.option(0, "class the blended images are relabelled to", min=0)
        min_alpha: float = bench.option(0.1, "weakest blend used in training", min=0, max=1)
        max_alpha: float = bench.option(0.3, "strongest blend used in training; tested halfway", min=0, max=1)

        def __post_init__(self):  # checked when the suite is read, before anything runs
            if self.min_alpha > self.max_alpha:
                raise ValueError(f"min_alpha {self.min_alpha} is above max_alpha {self.max_alpha}")

    def check_dataset(self, splits):
        check_target_class(self.name, self.options.target_class, splits.num_classes)

    def poison(self, train, ctx):
        # The pattern is drawn once per job seed; the training set is left as it is.
        pattern = torch.rand(train.x.shape[1:], generator=ctx.generator(self.name), device=train.x.device)
        return train, {"pattern": pattern, "poisoned_indices": torch.empty(0, dtype=torch.long, device=train.x.device)}

    def training_batch(self, model, x, y, generator, ctx, state):
        o = self.options
        count = int(o.poison_rate * len(x))  # the core shuffles every epoch: these are random images
        if count == 0:
            return x, y
        alpha = o.min_alpha + (o.max_alpha - o.min_alpha) * torch.rand((), generator=generator, device=x.device)
        x, y = x.clone(), y.clone()
        x[:count] = (1 - alpha) * x[:count] + alpha * state["pattern"]
        y[:count] = o.target_class
        return x, y

    def evaluate(self, model, test, ctx, state):
        o = self.options
        others = test.y != o.target_class
        alpha = (o.min_alpha + o.max_alpha) / 2
        pattern = (state["pattern"] * 255).to(test.x.device)
        triggered = ((1 - alpha) * test.x[others].float() + alpha * pattern).round().to(torch.uint8)
        predictions, labels = predict(model, triggered, ctx), test.y[others]
        return {
            "asr": backdoor_success_rate(predictions, labels, o.target_class),
            "ra": backdoor_robust_accuracy(predictions, labels, o.target_class),
        }


@bench.hookimpl
def register_attacks(register):
    register(CleanLabelPatch)
    register(JitteredBlend)
