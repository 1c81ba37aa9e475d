"""`error_injection`: fault sneaking (Zhao et al. 2019, after Liu et al., ICCAD 2017), a
post-training attack on the weights.

After training, ONE parameter tensor (`layer`; by default the weight of the model's last
`nn.Linear`) is changed by gradient descent so that `sneak_images` chosen images (S) are
classified as chosen wrong labels while `keep_images` other images (T) keep their labels. The
loss is a weighted mean of hinge losses max(0, max_other_logit - label_logit + margin): on S
towards the injected labels, weighted `sneak_weight`, and on T towards the true labels, weight
1. It runs for up to `steps` steps and, without a penalty (below), stops early once every hinge
is zero. Adam (the default) is insensitive to the loss scale, which is why it is used; `sgd`
(momentum 0.9) is offered for comparison. Every other parameter and buffer is checked to be
unchanged afterwards.

Where S and T come from: the reference draws both from test data, but here the pipeline
evaluates on a held-out test split, so S and T are drawn (seeded) from the TRAINING split: the
test images stay clean, and clean accuracy after the attack measures collateral damage on images
the attack never saw. Only images the trained model classifies correctly are drawn, so that
"keep" means keep a correct decision and every injection is a real change of decision. The
injected label of an S image is (y + r) mod C with r drawn uniformly from 1..C-1. T is capped at
the correctly classified images available in a seeded pool of 2(S+T) training images. S's
training indices are reported as `poisoned_indices`, so a defender's bonafide set drawn from
training data never holds the attacker's chosen images with their true labels.

The size of the change. The paper also minimises the number (L0) and the magnitude (L2) of the
changes delta = W - W0, W0 being the clean trained tensor, with ADMM; the hinge loss alone lets
Adam move nearly every element (all 1,280 of small_cnn's head on digits). `penalty` offers a
simple proximal-gradient form of the paper's objective, hinge loss + `penalty_weight` *
penalty(delta), with
- `none` (default): the hinge loss alone; it stops early once every hinge is zero;
- `l2`: the L2 norm ||delta||_2 (not squared), added to the loss and differentiated;
- `l1`: ||delta||_1, the convex surrogate of L0. Its subgradient never lands an element on zero,
  so after each optimizer step delta is soft-thresholded (its proximal step): by
  `penalty_weight` times each element's own step size (lr / (sqrt(v_hat) + eps) for Adam,
  lr / (1 - momentum) for SGD), so that a change survives only where the hinge gradient
  outweighs `penalty_weight`, as at a minimum of the penalized objective.
With a penalty every one of the `steps` steps runs: once the hinges are met, the penalty keeps
shrinking delta until they are just met. `prune_below` (0 = off) is then a hard L0 step: changes
with |delta| below it are reset to the clean values. It is not followed by more optimization, so
a large value can undo injections; `evaluate` shows it. On digits with small_cnn (width 8) and
the other defaults, `l1` at the default weight changed 229 of 1,280 elements with half the L2
norm (3.6 against 7.4), all four injections held and clean accuracy moved by 0.2 points.

The S and T images (uint8) and their labels are kept in the attack state, cached with the
model; `evaluate` measures on them (not on the test images it is given):
- `injection_success`: share of S classified as their injected labels (lower is better for
  the defender);
- `keep_agreement`: share of T still classified as their true labels;
- `changed_elements` (L0) and `change_l2`: how many elements of the tensor the attack changed and
  the L2 norm of the change, measured in `tamper` between the tampered tensor and the clean
  trained one and kept in the state. They describe the attack, not the model evaluated (a
  defense may change every weight), so they are reported from the state, the same before and
  after any defense: diagnostics, never ranked. A second model of the same job (an MCR endpoint)
  has its own change measured against its own clean tensor.
The margin (default 1.0, in logits) keeps the injected decisions stable when evaluation runs in
bf16 on CUDA while the optimization runs in float32.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import nn

import bench
from bench.toolkit import did_you_mean
from bench import BenchError
from bench.toolkit import predict, to_model_input
from bench.toolkit import accuracy


class Optimizer(enum.Enum):
    ADAM = "adam"
    SGD = "sgd"


class Penalty(enum.Enum):
    """A penalty on the change delta = W - W0, added to the hinge objective."""

    NONE = "none"
    L2 = "l2"
    L1 = "l1"


SGD_MOMENTUM = 0.9


def hinge(logits: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Per image, max(0, max_other_logit - label_logit + margin)."""
    label_logit = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return (others.max(dim=1).values - label_logit + margin).clamp_min(0)


def chosen_parameter(model: nn.Module, layer: str) -> tuple[str, nn.Parameter]:
    """The parameter to modify: by name (with or without the `net.` prefix of the classifier
    wrapper), or, for "", the weight of the last `nn.Linear`."""
    params = dict(model.named_parameters())
    if not layer:
        linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
        if not linears:
            raise BenchError(
                "error_injection: the model has no nn.Linear layer; set the layer option to one of "
                "its parameters: " + ", ".join(params)
            )
        layer = f"{linears[-1]}.weight" if linears[-1] else "weight"
    for name in (layer, f"net.{layer}"):
        if name in params:
            return name, params[name]
    raise BenchError(
        f"error_injection: the model has no parameter '{layer}'{did_you_mean(layer, list(params))}; "
        "its parameters: " + ", ".join(params)
    )


def _logits_from_owner(model: nn.Module, param: nn.Parameter, x: torch.Tensor):
    """A function computing the model's logits on `x` as `param` changes.

    When the module owning `param` runs once and its output IS the model's output (the usual
    case of the last linear layer), its input cannot depend on `param`: it is computed once and
    each step runs that module alone, which turns 500 full forward passes into 500 matrix
    products. Otherwise every step runs the whole model."""
    owner = next(m for m in model.modules() if any(p is param for p in m.parameters(recurse=False)))
    calls = []
    handle = owner.register_forward_hook(lambda module, args, output: calls.append((args, output)))
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        handle.remove()
    if len(calls) == 1 and calls[0][1] is logits and len(calls[0][0]) == 1:
        features = calls[0][0][0].detach()
        return lambda: owner(features)
    return lambda: model(x)


class ErrorInjection(bench.Attack):
    name = "error_injection"
    description = "Fault sneaking: one weight tensor tuned so chosen images get wrong labels, others unchanged"
    paper = "https://arxiv.org/abs/1905.12032"
    code = "https://github.com/IBM/model-sanitization"  # its error-injection/ folder
    stage = bench.Stage.POST_TRAINING
    metrics = (
        bench.Metric(
            "injection_success", "Inj. success", higher_is_better=False, doc="share of sneaked faults still active"
        ),
        bench.Metric("keep_agreement", "T agreement", higher_is_better=True, doc="kept images still agreeing"),
        # With 4 faults injection success moves in steps of 25 points: the count says so.
        bench.Metric(
            "faults_active",
            "Faults active",
            higher_is_better=False,
            kind=bench.MetricKind.NUMBER,
            doc="sneaked faults still active, counted (of the attack's sneak_images; 4 by default, so Inj. success "
            "moves in steps of 25 points)",
        ),
        # The size of the tampering itself, from the state: the same for every defense.
        bench.Metric(
            "changed_elements",
            "Changed weights (L0)",
            higher_is_better=None,
            kind=bench.MetricKind.NUMBER,
            diagnostic=True,
        ),
        bench.Metric("change_l2", "Change L2", higher_is_better=None, kind=bench.MetricKind.NUMBER, diagnostic=True),
    )
    success_metric = "injection_success"

    @dataclass(frozen=True)
    class Options:
        layer: str = bench.option("", "parameter to modify, e.g. 'linear.weight' (''=weight of the last nn.Linear)")
        sneak_images: int = bench.option(4, "images S pushed to chosen wrong labels", min=1)
        keep_images: int = bench.option(996, "images T that must keep their labels (capped at those available)", min=0)
        sneak_weight: float = bench.option(
            100.0, "weight of each S image's hinge loss (each T image's is 1)", min=0, min_exclusive=True
        )
        margin: float = bench.option(1.0, "logit margin the hinge losses demand", min=0)
        steps: int = bench.option(
            500, "most optimizer steps (without a penalty, stops once every hinge is zero)", min=1
        )
        optimizer: Optimizer = bench.option(Optimizer.ADAM, "adam, or sgd with momentum 0.9")
        lr: float = bench.option(0.01, "learning rate of the optimizer", min=0, min_exclusive=True)
        penalty: Penalty = bench.option(
            Penalty.NONE,
            "penalty on the change delta = W - W0 added to the loss: none, "
            "l2 (||delta||_2) or l1 (||delta||_1, by soft thresholding: "
            "fewer changed elements)",
        )
        penalty_weight: float = bench.option(
            0.003, "weight of the penalty against the weighted mean hinge loss (ignored when penalty is none)", min=0
        )
        prune_below: float = bench.option(
            0.0,
            "after optimizing, reset changes with |delta| below this to the clean values (a hard L0 step; 0 = off)",
            min=0,
        )

    def withheld_training_images(self, splits):
        return self.options.sneak_images + min(self.options.keep_images, len(splits.train))

    def check_model(self, model, sample):
        chosen_parameter(model, self.options.layer)

    def tamper(self, model, data, ctx, state):
        o = self.options
        if ctx.num_classes < 2:
            raise BenchError("error_injection: needs at least two classes to inject a wrong label")
        name, param = chosen_parameter(model, o.layer)
        train = data.train
        if "sneak_indices" in state:  # a second model of the same job (an MCR endpoint): the same faults
            sneak, keep, injected = state["sneak_indices"], state["keep_indices"], state["injected_labels"]
        else:
            sneak, keep, injected = self._choose_images(model, train, ctx)

        before = {key: value.detach().clone() for key, value in model.state_dict().items() if key != name}
        original = param.detach().clone()  # W0: this model's own clean tensor, also for a second model
        steps_taken = self._optimize(
            model,
            param,
            original,
            torch.cat([train.x[sneak], train.x[keep]]),
            torch.cat([injected, train.y[keep]]),
            len(sneak),
        )
        if o.prune_below > 0:
            with torch.no_grad():
                param.copy_(torch.where((param - original).abs() < o.prune_below, original, param))
        after = model.state_dict()
        changed = [key for key, value in before.items() if not torch.equal(after[key], value)]
        if changed:
            raise RuntimeError(f"error_injection changed tensors other than {name}: {', '.join(changed)}")
        delta = param.detach().double() - original.double()  # exact for float32 (and bf16) weights
        # Written over whatever `state` brought: a second model reports its own change.
        return {
            **state,
            "sneak_images": train.x[sneak],
            "sneak_labels": train.y[sneak],
            "injected_labels": injected,
            "keep_images": train.x[keep],
            "keep_labels": train.y[keep],
            "poisoned_indices": sneak.sort().values,
            "reserved_indices": torch.cat([sneak, keep]).sort().values,
            "sneak_indices": sneak,
            "keep_indices": keep,
            "layer": name,
            "steps_taken": steps_taken,
            "changed_elements": int((param.detach() != original).sum()),
            "change_l2": float(delta.norm()),
        }

    def _choose_images(self, model, train, ctx):
        """S and T among the training images the model classifies correctly, in a seeded order,
        and S's injected (wrong) labels."""
        o = self.options
        generator = ctx.generator("error_injection")
        order = torch.randperm(len(train), device=train.x.device, generator=generator)
        pool = order[: 2 * (o.sneak_images + o.keep_images)]
        correct = pool[predict(model, train.x[pool], ctx) == train.y[pool]]
        if len(correct) < o.sneak_images:
            raise BenchError(
                f"error_injection: only {len(correct)} of {len(pool)} drawn training images are "
                f"classified correctly, fewer than sneak_images = {o.sneak_images}; lower sneak_images "
                "or train the model longer"
            )
        sneak, keep = correct[: o.sneak_images], correct[o.sneak_images : o.sneak_images + o.keep_images]
        shift = torch.randint(1, ctx.num_classes, (len(sneak),), device=sneak.device, generator=generator)
        return sneak, keep, (train.y[sneak] + shift) % ctx.num_classes

    def _optimize(
        self,
        model: nn.Module,
        param: nn.Parameter,
        original: torch.Tensor,
        x_uint8: torch.Tensor,
        labels: torch.Tensor,
        sneak_count: int,
    ) -> int:
        """Gradient descent on `param` alone, penalizing its change from `original` as the
        options say; returns the number of steps taken."""
        o = self.options
        weights = torch.ones(len(labels), device=labels.device)
        weights[:sneak_count] = o.sneak_weight
        weights /= weights.sum()
        x = to_model_input(x_uint8)
        trainable = {p: p.requires_grad for p in model.parameters()}
        was_training = model.training
        model.eval()  # batch-norm statistics must not move: only `param` may change
        forward = _logits_from_owner(model, param, x)
        for p in trainable:
            p.requires_grad_(p is param)
        optimizer: torch.optim.Optimizer
        if o.optimizer is Optimizer.ADAM:
            optimizer = torch.optim.Adam([param], lr=o.lr)
        else:
            optimizer = torch.optim.SGD([param], lr=o.lr, momentum=SGD_MOMENTUM)
        penalized = o.penalty is not Penalty.NONE
        steps_taken = 0
        try:
            for steps_taken in range(o.steps):
                # Full precision: the hinge margins are small against bf16 rounding.
                loss = (weights * hinge(forward().float(), labels, o.margin)).sum()
                # Reading the loss syncs with the device: check every 10 steps only. With a
                # penalty, met hinges are no reason to stop: the change can still shrink.
                if not penalized and steps_taken % 10 == 0 and loss.item() == 0:
                    break
                if o.penalty is Penalty.L2:
                    loss = loss + o.penalty_weight * torch.linalg.vector_norm(param - original)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if o.penalty is Penalty.L1:
                    self._soft_threshold(param, original, optimizer)
            else:
                steps_taken = o.steps
        finally:
            for p, flag in trainable.items():
                p.requires_grad_(flag)
            param.grad = None
            model.train(was_training)
        return steps_taken

    @torch.no_grad()
    def _soft_threshold(self, param: nn.Parameter, original: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """The proximal step of penalty_weight * ||param - original||_1 after an optimizer step:
        each element's change shrinks towards zero by penalty_weight times the step size the
        optimizer gave that element per unit of gradient, and stops at zero."""
        group = optimizer.param_groups[0]
        if isinstance(optimizer, torch.optim.Adam):
            state = optimizer.state[param]
            beta2 = group["betas"][1]
            bias_correction2 = 1 - beta2 ** float(state["step"])
            step_size = group["lr"] / ((state["exp_avg_sq"] / bias_correction2).sqrt() + group["eps"])
        else:  # SGD with momentum: in a steady state a gradient g moves the weight lr * g / (1 - momentum)
            step_size = group["lr"] / (1 - SGD_MOMENTUM)
        delta = param - original
        shrunk = delta.sign() * (delta.abs() - self.options.penalty_weight * step_size).clamp_min(0)
        param.copy_(torch.where(shrunk == 0, original, original + shrunk))

    def evaluate(self, model, test, ctx, state):
        """Measures on the S and T images kept in `state`; `test` is not used. The size of the
        change is the one `tamper` made (kept in `state`), whatever `model` is now."""
        sneak = predict(model, state["sneak_images"], ctx)
        keep = predict(model, state["keep_images"], ctx)
        return {
            "injection_success": accuracy(sneak, state["injected_labels"]),
            "faults_active": float((sneak == state["injected_labels"]).sum()),
            "keep_agreement": accuracy(keep, state["keep_labels"]),
            "changed_elements": float(state["changed_elements"]),
            "change_l2": float(state["change_l2"]),
        }


@bench.hookimpl
def register_attacks(register):
    register(ErrorInjection)
