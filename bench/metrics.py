"""What a metric is (`Metric`: its key, label, direction, kind and doc line, declared by the
plugin that reports it and stored with every result), and the standard measures on tensors of
predictions and labels, as BackdoorBench defines them."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class MetricKind(enum.Enum):
    """How a metric's value is shown: the report renders by kind, never by key name."""

    PERCENT = "percent"  # a share in [0, 1], shown in percent
    FLAG = "flag"  # 0 or 1, shown as a warning mark where set
    NUMBER = "number"  # shown as it is (a chosen t, a count, a norm)
    SECONDS = "seconds"


@dataclass(frozen=True)
class Metric:
    """A metric an attack (or a defense, about itself) reports: its key in the store, its
    leaderboard label, whether a higher value is better for the defender (None: neither, e.g.
    a chosen hyper-parameter; never bolded), how it is shown, and whether it is a diagnostic
    (per-attack detail, shown in a second table under the headline one, never bolded). `doc`
    says what it measures, in a phrase (the leaderboard's glossary line); `headline` marks the
    metric a table is ranked by (an evasion attack's robust accuracy; the core's DER for attacks
    with a `success_metric`). The report reads all of it from the store, never from the plugin."""

    key: str
    label: str
    higher_is_better: bool | None
    kind: MetricKind = MetricKind.PERCENT
    diagnostic: bool = False
    doc: str = ""
    headline: bool = False

    def info(self) -> dict:
        """The metric's description as stored with every result."""
        return {
            "label": self.label,
            "higher_is_better": self.higher_is_better,
            "kind": self.kind.value,
            "diagnostic": self.diagnostic,
            "doc": self.doc,
            "headline": self.headline,
        }


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of predictions equal to the labels (C-Acc on clean test images)."""
    if len(labels) == 0:
        return float("nan")
    return (predictions == labels).float().mean().item()


def backdoor_success_rate(predictions: torch.Tensor, true_labels: torch.Tensor, target_class: int) -> float:
    """Of the triggered images whose true class is not the target, the fraction classified as
    the target (ASR)."""
    keep = true_labels != target_class
    if not keep.any():
        return float("nan")
    return (predictions[keep] == target_class).float().mean().item()


def backdoor_robust_accuracy(predictions: torch.Tensor, true_labels: torch.Tensor, target_class: int) -> float:
    """Of the triggered images whose true class is not the target, the fraction still
    classified as their true class (RA)."""
    keep = true_labels != target_class
    if not keep.any():
        return float("nan")
    return (predictions[keep] == true_labels[keep]).float().mean().item()


def defense_effectiveness_rating(asr_before: float, asr_after: float, acc_before: float, acc_after: float) -> float:
    """DER = (max(0, drop in ASR) - max(0, drop in clean accuracy) + 1) / 2, all in [0, 1]."""
    return (max(0.0, asr_before - asr_after) - max(0.0, acc_before - acc_after) + 1) / 2
