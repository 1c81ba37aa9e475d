import math

import pytest
import torch

from bench.metrics import accuracy, backdoor_success_rate, defense_effectiveness_rating, backdoor_robust_accuracy


def test_accuracy_is_the_share_of_predictions_equal_to_the_labels():
    assert accuracy(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 0])) == 0.75  # not the error rate, 0.25
    assert math.isnan(accuracy(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)))


def test_asr_and_ra_ignore_images_of_the_target_class():
    # target 0; the first image is of the target class and must not count
    predictions = torch.tensor([0, 0, 0, 0, 2, 3])
    true_labels = torch.tensor([0, 1, 2, 3, 2, 4])
    # 3 of the 5 non-target images went to the target (4 of 6, 0.67, if the target image counted)
    assert backdoor_success_rate(predictions, true_labels, target_class=0) == pytest.approx(0.6)
    # only the 2 -> 2 image kept its class (2 of 6, 0.33, if the target image counted)
    assert backdoor_robust_accuracy(predictions, true_labels, target_class=0) == pytest.approx(0.2)


def test_asr_and_ra_are_nan_without_non_target_images():
    assert math.isnan(backdoor_success_rate(torch.tensor([0]), torch.tensor([0]), 0))
    assert math.isnan(backdoor_robust_accuracy(torch.tensor([0]), torch.tensor([0]), 0))


@pytest.mark.parametrize(
    "asr_before, asr_after, acc_before, acc_after, expected",
    [
        (1.0, 0.0, 0.9, 0.9, 1.0),  # perfect: ASR gone, accuracy kept
        (1.0, 0.0, 0.9, 0.4, 0.75),  # ASR gone at a cost of 50 points of accuracy: (1 - 0.5 + 1) / 2
        (0.9, 0.3, 0.8, 0.7, 0.75),  # (0.6 - 0.1 + 1) / 2
        (0.9, 0.2, 0.8, 0.85, 0.85),  # accuracy rose: its negative drop is clamped, (0.7 - 0 + 1) / 2
        (0.2, 0.5, 0.9, 0.8, 0.45),  # ASR rose: its negative drop is clamped, (0 - 0.1 + 1) / 2
        (0.5, 0.8, 0.9, 0.95, 0.5),  # ASR rose and accuracy rose: both clamped
        (0.0, 0.0, 1.0, 0.0, 0.0),  # accuracy destroyed, nothing gained
    ],
)
def test_der_follows_backdoorbench(asr_before, asr_after, acc_before, acc_after, expected):
    assert defense_effectiveness_rating(asr_before, asr_after, acc_before, acc_after) == pytest.approx(expected)
