"""The `neural_cleanse` defense: the MAD anomaly index and the cost schedule as the paper's code
computes them, and on small digits models that it flags the BadNets target with a reversed
mask on the true trigger, unlearns it (where plain fine-tuning on the same budget does not),
and leaves a clean model untouched."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import bench
from bench_plugins.defenses import neural_cleanse
from bench_plugins.defenses.neural_cleanse import (
    NeuralCleanse,
    ReversedTriggers,
    _CostSchedule,
    anomaly_indices,
    stamp,
    unlearning_set,
)
from bench_plugins.testing import backdoored_digits_model

# Few reverse-engineering steps: 40 epochs of 5 steps of 32 images per class (the default is 80
# epochs of 10 steps of 256), and 10 unlearning epochs of 1,000 samples (default 100 of 2,500).
FAST = dict(
    reverse_epochs=40,
    reverse_samples_per_epoch=160,
    reverse_batch_size=32,
    epochs=10,
    samples_per_epoch=1000,
    batch_size=128,
)
TRIGGER = (slice(5, 7), slice(5, 7))  # BadNets' 2x2 trigger, bottom right, 1 pixel from the border


@pytest.fixture(scope="module")
def badnets():
    """A BadNets model, Neural Cleanse's result on it, and its reversed triggers (the same
    seeded reverse engineering, which the result does not carry)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        backdoored = backdoored_digits_model(epochs=8, seed=0)
        defense = NeuralCleanse(NeuralCleanse.Options(**FAST))
        defended = defense.apply(copy.deepcopy(backdoored.model), backdoored.bonafide, backdoored.ctx)
        bonafide, ctx = backdoored.bonafide, backdoored.ctx
        triggers = neural_cleanse.reverse_engineer(backdoored.model, bonafide, ctx, defense.options)
    finally:
        torch.set_num_threads(threads)
    return backdoored, defended, triggers


def test_anomaly_index_is_the_papers_mad_and_only_small_masks_count():
    norms = torch.tensor([10.0, 12.0, 11.0, 9.0, 2.0, 30.0])
    indices, below = anomaly_indices(norms)
    median = 10.5  # an even count: the mean of the two middle values, as numpy's median
    mad = 1.4826 * 1.5  # deviations 0.5 1.5 0.5 1.5 8.5 19.5: median 1.5
    assert indices.tolist() == pytest.approx([abs(n - median) / mad for n in norms.tolist()], rel=1e-6)
    assert below.tolist() == [True, False, False, True, True, False]
    flagged = (below & (indices > 2)).nonzero().flatten().tolist()
    assert flagged == [4]  # 30 is as far out, but a large mask is no trigger
    equal, _ = anomaly_indices(torch.full((4,), 7.0))
    assert torch.isfinite(equal).all() and (equal == 0).all()


def test_cost_schedule_goes_up_on_success_down_on_failure_and_keeps_the_smallest_successful_mask():
    options = NeuralCleanse.Options(patience=2, init_cost=1e-3, cost_multiplier=2.0, early_stop=False)
    masks = torch.zeros(2, 1, 2, 2)
    schedule = _CostSchedule(options, masks, torch.zeros(2, 1, 2, 2))
    success = torch.tensor([1.0, 0.5])  # class 0 always succeeds, class 1 never
    for epoch in range(4):
        current = torch.full((2, 1, 2, 2), float(epoch))
        schedule.end_epoch(success, torch.tensor([10.0 - epoch, 1.0]), current, current)
    assert schedule.cost.tolist() == pytest.approx([1e-3 * 2 * 2, 1e-3 / 2**1.5 / 2**1.5])
    assert schedule.went_up.tolist() == [True, False] and schedule.went_down.tolist() == [False, True]
    best_masks, _ = schedule.result(torch.full((2, 1, 2, 2), 9.0), torch.zeros(2, 1, 2, 2))
    assert (best_masks[0] == 3).all()  # the last epoch's, with the smallest norm (7)
    assert (best_masks[1] == 9).all()  # never succeeded: the final mask


def test_flags_the_badnets_target_with_a_small_mask_on_the_trigger(badnets):
    backdoored, defended, triggers = badnets
    rows = defended.series["neural_cleanse_classes"]
    norms = torch.tensor([row["mask_l1"] for row in rows])
    flagged = [row["class"] for row in rows if row["flagged"]]
    assert 0 in flagged and defended.values["flagged_classes"] == len(flagged)
    assert norms.argmin() == 0 and norms[0] < 0.5 * norms.median()
    assert defended.values["anomaly_index"] == pytest.approx(rows[0]["anomaly_index"])
    assert rows[0]["anomaly_index"] > 2
    assert rows[0]["trigger_success"] > 0.9

    assert triggers.norms.tolist() == pytest.approx(norms.tolist(), rel=1e-5)  # seeded: the same run
    mask = triggers.masks[0, 0]
    on_trigger = mask[TRIGGER].sum() / mask.sum()
    assert on_trigger > 0.4  # 4 of 64 pixels: a mask placed at random would put ~6% there
    assert mask.argmax() // 8 in (5, 6) and mask.argmax() % 8 in (5, 6)


def test_unlearning_removes_the_backdoor_where_plain_fine_tuning_does_not(badnets, one_cpu_thread):
    backdoored, defended, _ = badnets
    asr_before, accuracy_before = backdoored.asr(backdoored.model), backdoored.accuracy(backdoored.model)
    assert asr_before > 0.9
    assert backdoored.asr(defended.model) < 0.3
    assert backdoored.accuracy(defended.model) > accuracy_before - 0.03

    # the same fine-tuning, without the stamped images: the reversed trigger is what unlearns
    plain = copy.deepcopy(backdoored.model)
    NeuralCleanse(NeuralCleanse.Options(**FAST))._unlearn(plain, backdoored.bonafide, backdoored.ctx)
    assert backdoored.asr(plain) > 0.5


def test_a_clean_model_is_flagged_nowhere_and_returned_unchanged(one_cpu_thread):
    clean = backdoored_digits_model(epochs=8, seed=0, attack={"name": "badnets", "poison_rate": 0.0})
    model = copy.deepcopy(clean.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = NeuralCleanse(NeuralCleanse.Options(**FAST)).apply(model, clean.bonafide, clean.ctx)
    assert result.values["flagged_classes"] == 0
    assert result.values["anomaly_index"] <= 2
    assert not any(row["flagged"] for row in result.series["neural_cleanse_classes"])
    assert result.model is model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())  # frozen only while reversing


def test_unlearning_set_stamps_a_fifth_of_the_images_per_flagged_class_under_their_true_labels():
    # image i is all 100 + i, so every image in the set says which bonafide image it came from
    bonafide = bench.ImageData(
        (100 + torch.arange(50, dtype=torch.uint8)).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).clone(),
        torch.arange(50) % 10,
    )
    masks = torch.zeros(3, 1, 8, 8)
    masks[1, 0, 0, 0] = 1.0
    masks[2, 0, 7, 7] = 1.0
    triggers = ReversedTriggers(masks, torch.ones(3, 1, 8, 8))
    data = unlearning_set(bonafide, [1, 2], triggers, 0.2, torch.Generator().manual_seed(0))
    assert len(data) == 40 + 2 * 10
    source = data.x[:, 0, 3, 3].long() - 100  # a pixel no trigger covers
    assert torch.equal(data.y, source % 10)  # true labels throughout
    clean, first, second = source[:40], source[40:50], source[50:]
    assert len(set(clean.tolist())) == 40 and torch.equal(first, second)
    assert set(first.tolist()) == set(range(50)) - set(clean.tolist())
    assert torch.equal(data.x[:40], bonafide.x[clean])
    expected_first = stamp(bonafide.x[first].float() / 255, masks[1], torch.ones(1, 8, 8))
    assert torch.equal(data.x[40:50], (expected_first * 255).round().to(torch.uint8))
    assert (data.x[40:50, 0, 0, 0] == 255).all() and (data.x[50:, 0, 7, 7] == 255).all()
    assert (data.x[50:, 0, 0, 0] != 255).all()


def test_options_default_to_the_references():
    options = NeuralCleanse.Options()
    assert (options.mask_lr, options.init_cost, options.cost_multiplier, options.patience) == (0.1, 1e-3, 2.0, 5)
    assert (options.reverse_epochs, options.anomaly_threshold, options.unlearning_ratio) == (80, 2.0, 0.2)
    assert (options.epochs, options.lr, options.weight_decay) == (100, 0.01, 5e-4)
    assert dataclasses.is_dataclass(options)


def test_neural_cleanse_registers_through_the_hook():
    registered = []
    neural_cleanse.register_defenses(register=registered.append)
    assert registered == [NeuralCleanse] and NeuralCleanse.name == "neural_cleanse"
    assert {m.key for m in NeuralCleanse.metrics} == {"flagged_classes", "anomaly_index"}
    assert all(m.higher_is_better is None and m.kind == bench.MetricKind.NUMBER for m in NeuralCleanse.metrics)
