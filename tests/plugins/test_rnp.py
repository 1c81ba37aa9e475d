"""The `rnp` defense: unlearning stops at the clean threshold and leaves the backdoor in place,
the recovered masks single out the backdoor's neurons, the ORIGINAL model is pruned (never the
unlearned one), only bonafide images are read (the held-out ones only to choose the amount),
and the backdoor goes on the tiny BadNets model while clean accuracy stays. The neuron masks
and the held-out rule themselves are tested in test_anp.py."""

from __future__ import annotations

import copy

import pytest
import torch

import bench
from bench.toolkit import clean_accuracy, predict, to_model_input
from bench_plugins.defenses import rnp
from bench_plugins.defenses._neuron_masks import neuron_layers, split_held_out
from bench_plugins.defenses.rnp import Rnp, recover_masks, unlearn
from bench_plugins.testing import backdoored_digits_model
from test_anp import assert_lowest_masks_carry_the_backdoor

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

# The width-8 small_cnn has 56 neurons (ResNet-18: 4,800), so each mask moves far faster under
# the same lr: recovering for the default 80 steps drives a third of the masks to zero, and
# pruning them all costs the clean task, so the held-out rule prunes nothing. Four steps (two
# one-pass epochs over 140 images) keep the ranking; 200 bonafide images leave 60 held out.
SMALL = {"samples_per_epoch": 0, "recovering_epochs": 2, "held_out_share": 0.3}


@pytest.fixture(scope="module")
def backdoored():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield backdoored_digits_model(epochs=8, seed=0, bonafide_size=200)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def defended(backdoored):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield Rnp(Rnp.Options(**SMALL)).apply(copy.deepcopy(backdoored.model), backdoored.bonafide, backdoored.ctx)
    finally:
        torch.set_num_threads(threads)


def test_unlearning_stops_after_the_first_epoch_at_the_clean_threshold_and_keeps_the_backdoor(backdoored):
    b = backdoored
    options = Rnp.Options(**SMALL)
    unlearned, history = unlearn(b.model, b.bonafide, b.ctx, options)
    accuracies = [row["train_acc"] for row in history]
    assert accuracies[-1] <= 0.2 < min(accuracies[:-1]) and len(history) < 20
    assert accuracies[0] > 0.9  # the first epoch starts from the trained model
    # the unlearned model lost the clean task but not the backdoor (the paper's observation)
    assert b.accuracy(unlearned) < 0.4 and b.asr(unlearned) > 0.9
    assert b.asr(b.model) > 0.95 and b.accuracy(b.model) > 0.95  # the original is untouched

    never, history = unlearn(b.model, b.bonafide, b.ctx, Rnp.Options(clean_threshold=0.0, unlearning_epochs=12))
    assert len(history) == 12  # the threshold is never reached: every epoch runs, lr x0.1 from epoch 11
    assert [row["lr"] for row in history] == pytest.approx([0.01] * 10 + [0.001] * 2)


def test_the_lowest_recovered_masks_mark_the_neurons_that_carry_the_backdoor(backdoored, defended):
    assert_lowest_masks_carry_the_backdoor(backdoored, defended, (5, 8))


def test_rnp_removes_most_of_the_backdoor_and_keeps_clean_accuracy(backdoored, defended):
    b = backdoored
    asr_before, accuracy_before = b.asr(b.model), b.accuracy(b.model)
    assert asr_before > 0.95
    assert b.asr(defended.model) < 0.25 * asr_before
    assert b.accuracy(defended.model) >= accuracy_before - 0.05


def test_the_original_model_is_pruned_not_the_unlearned_one(backdoored, defended):
    original = backdoored.model.state_dict()
    pruned = defended.model.state_dict()
    names = [name for name, _ in neuron_layers(backdoored.model)]
    zeroed = {(f"{names[r['layer']]}.weight", r["channel"]) for r in defended.series["pruned_neurons"]}
    assert len(zeroed) == defended.values["pruned_neurons"] > 0
    for key, value in original.items():
        if key.endswith(".weight") and key[: -len(".weight")] in names:
            expected = value.clone()
            expected[[c for k, c in zeroed if k == key]] = 0.0
            assert torch.equal(pruned[key], expected), key
        else:
            assert torch.equal(pruned[key], value), key
    # the chosen candidate is the largest within 10% of the unpruned model's held-out accuracy
    _, held_out = split_held_out(backdoored.bonafide, 0.3, backdoored.ctx.generator("rnp_held_out"), "rnp")
    baseline = clean_accuracy(backdoored.model, held_out, backdoored.ctx)
    rows = defended.series["prune_candidates"]
    within = [r for r in rows if baseline - r["held_out_acc"] <= 0.1 * baseline + 1e-9]
    assert within[-1]["chosen"] and sum(r["chosen"] for r in rows) == 1
    assert clean_accuracy(defended.model, held_out, backdoored.ctx) == pytest.approx(within[-1]["held_out_acc"])


def test_rnp_reads_only_its_mask_images_and_never_the_test_set(backdoored, defended):
    """The masks come from the non-held-out bonafide images alone; scrambling the test set
    changes nothing, and every image the model ever sees is a bonafide one."""
    b = backdoored
    options = Rnp.Options(**SMALL)
    learn_on, _ = split_held_out(b.bonafide, 0.3, b.ctx.generator("rnp_held_out"), "rnp")
    unlearned, _ = unlearn(b.model, learn_on, b.ctx, options)
    direct = recover_masks(unlearned, learn_on, b.ctx, options)
    assert [row["mask"] for row in defended.series["neuron_masks"]] == pytest.approx(direct.tolist(), abs=1e-6)

    allowed = {row.numpy().tobytes() for row in to_model_input(b.bonafide.x)}
    seen: list[torch.Tensor] = []
    model = copy.deepcopy(b.model)
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    saved = [(data, data.x.clone(), data.y.clone()) for data in (b.splits.test, b.evaluation)]
    try:
        for data, _, _ in saved:
            data.x.copy_(torch.randint(0, 256, data.x.shape, dtype=torch.uint8))
            data.y.copy_(data.y[torch.randperm(len(data.y))])
        again = Rnp(options).apply(model, b.bonafide, b.ctx)
    finally:
        for data, x, y in saved:
            data.x.copy_(x)
            data.y.copy_(y)
    assert again.values == defended.values and again.series == defended.series
    assert all(torch.equal(v, defended.model.state_dict()[k]) for k, v in again.model.state_dict().items())
    assert seen and all(row.numpy().tobytes() in allowed for batch in seen for row in batch)


def test_the_unlearned_model_predicts_the_target_class(backdoored):
    """RNP's premise, on which the recovered masks rest: unlearning the clean task exposes the
    backdoor, the unlearned model sending clean images to the target class."""
    b = backdoored
    unlearned, _ = unlearn(b.model, b.bonafide, b.ctx, Rnp.Options(**SMALL))
    predictions = predict(unlearned, b.evaluation.x, b.ctx)
    assert (predictions == 0).float().mean().item() > 0.5


def test_rnp_registers_through_the_hook():
    registered = []
    rnp.register_defenses(register=registered.append)
    assert registered == [Rnp] and Rnp.name == "rnp" and Rnp.defender_data is bench.DefenderData.BONAFIDE
