"""CPU micro-benchmarks (pytest-benchmark), kept out of the test suite:

    pytest benchmarks/test_cpu_speed.py --benchmark-enable

They time the pieces every job runs: augmentation on device tensors, batched inference,
one training epoch of the quickstart model on digits."""

import dataclasses

import torch

from bench.context import RunContext
from bench.evaluation import predict
from bench.models import Classifier, InputShape
from bench.training import random_crop_flip, train_classifier
from bench_plugins.datasets.digits import Digits
from bench_plugins.models.small_cnn import SmallCNN

CTX = RunContext(device=torch.device("cpu"), seed=0, num_classes=10, eval_batch_size=1024)


def quickstart_model():
    torch.manual_seed(0)
    return Classifier(SmallCNN().build(InputShape(1, 8, 8, 10)), (0.3,), (0.4,))


def test_crop_flip_cifar_batch(benchmark):
    x = torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8)
    benchmark(random_crop_flip, x, 4, True, torch.Generator().manual_seed(0))


def test_predict_digits_test_set(benchmark):
    data = Digits().load()
    benchmark(predict, quickstart_model(), data.test.x, CTX)


def test_train_one_epoch_digits(benchmark):
    data = Digits().load()
    recipe = dataclasses.replace(SmallCNN.recipe, epochs=1)
    benchmark(lambda: train_classifier(quickstart_model(), data.train, recipe, CTX, flip=False))
