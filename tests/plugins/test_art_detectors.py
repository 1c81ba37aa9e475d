"""`activation_clustering` and `spectral_signature`, ART's poison detectors as filtering
defenses: ART reads the last hidden layer (not the logits its PyTorch wrapper would give), the
flagged images are mostly the poisoned ones, and the model retrained without them loses most of
the backdoor."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn

import bench
from bench.models import Classifier
from bench_plugins.defenses.activation_clustering import (
    ActivationClustering,
    classification_head,
    last_hidden_layer_model,
)
from bench_plugins.defenses.spectral_signature import SpectralSignature
from bench_plugins.models.preact_resnet18 import PreActResNet18
from bench_plugins.models.small_cnn import SmallCNN
from bench_plugins.testing import TINY_ATTACK, backdoored_digits_model

pytestmark = pytest.mark.usefixtures("one_cpu_thread")
SHAPE = bench.InputShape(1, 8, 8, 10)
EPOCHS = 8  # each of the two trainings: the attacked model's own budget


def small_cnn(mean=(0.5,), std=(0.25,)) -> Classifier:
    torch.manual_seed(1)
    return Classifier(SmallCNN(SmallCNN.Options(width=8)).build(SHAPE), mean, std)


def detection(removed: torch.Tensor, poisoned: torch.Tensor, total: int) -> tuple[float, float]:
    """(TPR, FPR) of the removed indices against the poisoned ones."""
    is_removed = torch.zeros(total, dtype=torch.bool)
    is_removed[removed] = True
    is_poisoned = torch.zeros(total, dtype=torch.bool)
    is_poisoned[poisoned] = True
    return is_removed[is_poisoned].float().mean().item(), is_removed[~is_poisoned].float().mean().item()


def backdoored(poison_rate: float):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return backdoored_digits_model(epochs=8, seed=0, attack={**TINY_ATTACK, "poison_rate": poison_rate})
    finally:
        torch.set_num_threads(threads)


def defend(b, defense):
    """Apply `defense` as the core would (a fresh model of the architecture and the poisoned
    training set); return its result, (TPR, FPR), and the ASR before and after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = defense.apply(small_cnn(b.splits.mean, b.splits.std), b.poisoned_train, b.ctx)
    finally:
        torch.set_num_threads(threads)
    rates = detection(result.removed_training_indices.cpu(), b.attack_state["poisoned_indices"], len(b.poisoned_train))
    return result, rates, b.asr(b.model), b.asr(result.model)


def test_the_head_is_the_last_linear_and_art_reads_its_input():
    sample = torch.rand(2, 1, 8, 8)
    assert classification_head(small_cnn(), sample, "ac") == "net.12"
    preact = Classifier(PreActResNet18(PreActResNet18.Options(width=2)).build(SHAPE), (0.5,), (0.25,))
    assert classification_head(preact, sample, "ac") == "net.linear"

    model = small_cnn().eval()
    head_inputs = []
    model.get_submodule("net.12").register_forward_hook(lambda m, args, out: head_inputs.append(args[0]))
    with torch.no_grad():
        model(sample)
        features = last_hidden_layer_model(model, sample, "ac")(sample)
    assert features.shape == (2, 128) and torch.equal(features, head_inputs[0])
    assert isinstance(model.get_submodule("net.12"), nn.Linear)  # the copy was changed, not the model

    pytest.importorskip("art")
    from art.estimators.classification import PyTorchClassifier

    wrapped = PyTorchClassifier(
        model=last_hidden_layer_model(model, sample, "ac"),
        loss=nn.CrossEntropyLoss(),
        input_shape=(1, 8, 8),
        nb_classes=10,
    )
    # the last of ART's layers, which its detectors read, is the last hidden layer
    activations = wrapped.get_activations(sample.numpy(), layer=len(wrapped.layer_names) - 1)
    assert np.allclose(activations, features.numpy(), atol=1e-6)

    scaled = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Tanh()), (0.5,), (0.25,))
    with pytest.raises(bench.BenchError, match="not that of an nn.Linear head"):
        classification_head(scaled, sample, "ac")


def test_without_art_the_defense_says_how_to_install_it_before_training(monkeypatch):
    monkeypatch.setitem(sys.modules, "art", None)  # `import art` now raises ImportError
    train = bench.ImageData(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64))
    ctx = bench.DefenseContext(device=torch.device("cpu"), seed=0, num_classes=10, recipe=SmallCNN.recipe)
    for defense in (ActivationClustering(), SpectralSignature()):
        with pytest.raises(bench.BenchError, match=r"pip install 'robustness-bench\[art\]'"):
            defense.apply(small_cnn(), train, ctx)


def test_activation_clustering_removes_the_poisoned_cluster_and_the_backdoor_with_it():
    pytest.importorskip("art")
    # 5%: the poisoned images are a minority of their label, which ART's default "smaller" rule
    # assumes; at 10% they are as many as the clean images of the target class, and which of the
    # two clusters is smaller is a coin toss
    b = backdoored(0.05)
    numpy_state = np.random.get_state()
    result, (tpr, fpr), asr_before, asr_after = defend(b, ActivationClustering(ActivationClustering.Options(EPOCHS)))
    assert tpr > fpr + 0.3  # seen: 0.91 against 0.34 (the smaller cluster of every clean class)
    assert asr_after < asr_before - 0.5  # seen: 0.94 -> 0.12
    assert b.accuracy(result.model) > 0.85
    removed = result.removed_training_indices
    assert removed.dtype == torch.int64 and len(removed.unique()) == len(removed)
    assert sum(row["removed"] for row in result.series["removed_per_class"]) == len(removed)
    assert all(0 < row["removed"] < row["images"] / 2 + 1 for row in result.series["removed_per_class"])
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state))


def test_spectral_signature_removes_the_top_scores_of_each_class_and_the_backdoor_with_them():
    pytest.importorskip("art")
    b = backdoored(0.1)
    result, (tpr, fpr), asr_before, asr_after = defend(b, SpectralSignature(SpectralSignature.Options(EPOCHS)))
    assert tpr > fpr + 0.3  # seen: 0.95 against 0.44
    assert asr_after < asr_before - 0.5  # seen: 1.0 -> 0.16
    # ART's defaults remove 1.5 x 0.33 of every class
    for row in result.series["removed_per_class"]:
        assert row["removed"] / row["images"] == pytest.approx(0.495, abs=0.02)
