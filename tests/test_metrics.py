import math

import pytest
import torch

from bench.metrics import accuracy, attack_success_rate, defense_effectiveness_rating, robust_accuracy


def test_accuracy_counts_matching_predictions():
    assert accuracy(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 0])) == 0.5


def test_asr_and_ra_ignore_images_of_the_target_class():
    # target 0; the first image is of the target class and must not count
    predictions = torch.tensor([0, 0, 0, 2, 3])
    true_labels = torch.tensor([0, 1, 2, 2, 4])
    assert attack_success_rate(predictions, true_labels, target_class=0) == 0.5  # 2 of 4 went to the target
    assert robust_accuracy(predictions, true_labels, target_class=0) == 0.25  # only the 2 -> 2 image


def test_asr_is_nan_without_non_target_images():
    assert math.isnan(attack_success_rate(torch.tensor([0]), torch.tensor([0]), 0))


@pytest.mark.parametrize("asr_before, asr_after, acc_before, acc_after, expected", [
    (1.0, 0.0, 0.9, 0.9, 1.0),     # perfect: ASR gone, accuracy kept
    (1.0, 1.0, 0.9, 0.9, 0.5),     # no effect
    (1.0, 0.0, 0.9, 0.4, 0.75),    # ASR gone at a cost of 50 points of accuracy
    (0.5, 0.8, 0.9, 0.95, 0.5),    # ASR rose and accuracy rose: both clipped at zero
    (0.0, 0.0, 1.0, 0.0, 0.0),     # accuracy destroyed, nothing gained
])
def test_der_follows_backdoorbench(asr_before, asr_after, acc_before, acc_after, expected):
    assert defense_effectiveness_rating(asr_before, asr_after, acc_before, acc_after) == pytest.approx(expected)
