import dataclasses

import pytest
import torch

import bench
from bench.evaluation import clean_accuracy
from bench.models import Classifier, TrainRecipe
from bench.training import lr_schedule, random_crop_flip, train_classifier
from bench_plugins.datasets.digits import Digits
from bench_plugins.models.small_cnn import SmallCNN


def test_crop_without_padding_or_flip_is_identity():
    x = torch.randint(0, 256, (5, 3, 6, 6), dtype=torch.uint8)
    assert torch.equal(random_crop_flip(x, 0, False, torch.Generator().manual_seed(0)), x)


def crops_drawn(padding: int, flip: bool, count: int = 400) -> list[tuple[int, int, bool]]:
    """(row shift, column shift, mirrored) of each augmented copy of one 4x4 image whose 16
    pixels are distinct and non-zero, so that each window of the padded image is told apart."""
    image = torch.arange(1, 17, dtype=torch.uint8).view(1, 1, 4, 4)
    out = random_crop_flip(image.expand(count, 1, 4, 4), padding, flip, torch.Generator().manual_seed(3))
    padded = torch.nn.functional.pad(image[0], (padding,) * 4)
    windows = {
        (r, c, mirrored): padded[:, r : r + 4, c : c + 4].flip(-1) if mirrored else padded[:, r : r + 4, c : c + 4]
        for r in range(2 * padding + 1)
        for c in range(2 * padding + 1)
        for mirrored in (False, True)
    }
    drawn = []
    for copy in out:
        (crop,) = [key for key, window in windows.items() if torch.equal(copy, window)]  # exactly one window
        drawn.append(crop)
    return drawn


def test_each_image_gets_its_own_random_window_of_every_shift_and_mirroring():
    drawn = crops_drawn(padding=1, flip=True)
    # all 3 x 3 shifts, each mirrored or not: 18 crops, each drawn about 400 / 18 = 22 times
    assert set(drawn) == {(r, c, m) for r in range(3) for c in range(3) for m in (False, True)}
    assert 150 < sum(m for _, _, m in drawn) < 250  # half are mirrored
    assert {m for _, _, m in crops_drawn(padding=1, flip=False)} == {False}
    assert {(r, c) for r, c, _ in crops_drawn(padding=0, flip=True)} == {(0, 0)}


def test_schedule_warms_up_linearly_then_decays_linearly_to_zero():
    # 10 steps, 20% warm-up: 2 steps rising to the peak, then 8 falling by 1/8 each
    factor = lr_schedule(TrainRecipe(warmup_fraction=0.2), total_steps=10)
    assert [factor(s) for s in range(11)] == pytest.approx(
        [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0]
    )
    no_warmup = lr_schedule(TrainRecipe(warmup_fraction=0.0), total_steps=10)
    assert [no_warmup(s) for s in (0, 1, 4, 9)] == pytest.approx([1.0, 1.0, 6 / 9, 1 / 9])


def test_a_small_cnn_trained_three_epochs_reads_held_out_digits_far_above_chance(one_cpu_thread):
    splits = Digits().load()
    ctx = bench.RunContext(device=torch.device("cpu"), seed=0, num_classes=10, show_progress=False)
    ctx.seed_global_rng("model")
    net = SmallCNN(SmallCNN.Options(width=8)).build(bench.InputShape(1, 8, 8, 10))
    model = Classifier(net, splits.mean, splits.std)
    losses = train_classifier(model, splits.train, dataclasses.replace(SmallCNN.recipe, epochs=3), ctx, flip=False)
    assert losses[0] > losses[1] > losses[2]
    assert clean_accuracy(model, splits.test, ctx) > 0.9  # chance is 0.1


def test_reference_schedule_values():
    from bench.training import reference_lr_factor

    # 100 epochs: constant through epoch 50 (progress 0.5), 0.505 at progress 0.7, 1% from progress 0.9 on
    assert [reference_lr_factor(e, 100) for e in (0, 49)] == [1.0, 1.0]
    assert abs(reference_lr_factor(69, 100) - 0.505) < 1e-9
    assert abs(reference_lr_factor(89, 100) - 0.01) < 1e-9 and reference_lr_factor(99, 100) == 0.01
    assert reference_lr_factor(60, 100) > reference_lr_factor(61, 100)


def test_an_epoch_repeats_small_data_evenly_to_fill_its_samples():
    from bench.training import epoch_order

    order = epoch_order(50, 10_000, torch.Generator().manual_seed(0), "cpu")
    assert len(order) == 10_000 and torch.bincount(order).tolist() == [200] * 50
    assert not torch.equal(order[:50], torch.arange(50))  # shuffled
    assert sorted(epoch_order(3000, 10_000, torch.Generator(), "cpu").tolist())[:3] == [0, 0, 0]
    assert sorted(epoch_order(20_000, 10_000, torch.Generator(), "cpu").tolist()) == list(range(20_000))


def test_repair_defenses_take_the_same_number_of_steps_whatever_the_bonafide_size(monkeypatch, one_cpu_thread):
    """The MCR reference's budget: 10,000 samples per epoch, so one epoch is 79 steps of 128
    whether the defender has 50 or 2500 images (one pass over 50 images would be 1 step)."""
    import bench
    from bench.models import Classifier
    from bench_plugins.defenses.fine_pruning import FinePruning
    from bench_plugins.defenses.finetune import FineTune
    from bench_plugins.defenses.mcr import ModeConnectivityRepair, TSelection
    from bench_plugins.models.small_cnn import SmallCNN

    steps = []
    original_step = torch.optim.SGD.step

    def counting_step(self, *args, **kwargs):
        steps.append(1)
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", counting_step)
    shape = bench.InputShape(1, 8, 8, 10)

    def model():
        torch.manual_seed(0)
        return Classifier(SmallCNN(SmallCNN.Options(width=2)).build(shape), (0.5,), (0.25,)).eval()

    defenses = {
        "finetune": FineTune(FineTune.Options(epochs=1)),
        "fine_pruning": FinePruning(FinePruning.Options(epochs=1, batch_size=128)),
        "mcr": ModeConnectivityRepair(
            ModeConnectivityRepair.Options(epochs=1, t_selection=TSelection.FIXED, path_points=2)
        ),
    }
    counted = {}
    for size in (50, 2500):
        generator = torch.Generator().manual_seed(size)
        bonafide = bench.ImageData(
            torch.randint(0, 256, (size, 1, 8, 8), dtype=torch.uint8, generator=generator),
            torch.randint(0, 10, (size,), generator=generator),
        )
        for name, defense in defenses.items():
            ctx = bench.DefenseContext(
                device=torch.device("cpu"),
                seed=0,
                num_classes=10,
                recipe=SmallCNN.recipe,
                attacked_model_with_seed=lambda seed: model(),
            )
            steps.clear()
            defense.apply(model(), bonafide, ctx)
            counted[name, size] = len(steps)
    assert counted == {(name, size): 79 for name in defenses for size in (50, 2500)}


def test_cosine_schedule_values():
    from bench.training import cosine_lr_factor

    assert [cosine_lr_factor(e, 4) for e in range(4)] == pytest.approx([1.0, 0.853553, 0.5, 0.146447], abs=1e-6)


def test_the_baselines_train_as_their_references_do(monkeypatch, one_cpu_thread):
    """finetune: train_baseline.py's plain momentum and per-epoch schedule; fine_pruning:
    BackdoorBench's plain momentum and per-epoch cosine annealing. Recorded per optimizer step."""
    from bench_plugins.defenses.fine_pruning import FinePruning
    from bench_plugins.defenses.finetune import FineTune

    seen = []
    original_step = torch.optim.SGD.step

    def recording_step(self, *args, **kwargs):
        group = self.param_groups[0]
        seen.append((group["nesterov"], group["momentum"], round(group["lr"], 6)))
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    shape = bench.InputShape(1, 8, 8, 10)
    generator = torch.Generator().manual_seed(0)
    bonafide = bench.ImageData(
        torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8, generator=generator),
        torch.randint(0, 10, (64,), generator=generator),
    )
    runs = {
        "finetune": FineTune(FineTune.Options(epochs=4, samples_per_epoch=0, batch_size=64, lr=0.1)),
        "fine_pruning": FinePruning(FinePruning.Options(epochs=4, samples_per_epoch=0, batch_size=64, lr=0.1)),
    }
    lrs = {}
    for name, defense in runs.items():
        torch.manual_seed(0)
        model = Classifier(SmallCNN(SmallCNN.Options(width=2)).build(shape), (0.5,), (0.25,)).eval()
        ctx = bench.DefenseContext(
            device=torch.device("cpu"),
            seed=0,
            num_classes=10,
            recipe=SmallCNN.recipe,
            attacked_model_with_seed=lambda seed: model,
        )
        seen.clear()
        defense.apply(model, bonafide, ctx)
        assert {(nesterov, momentum) for nesterov, momentum, _ in seen} == {(False, 0.9)}
        lrs[name] = [lr for _, _, lr in seen]
    # one step per epoch; reference: constant to half, then down to 1% at 90% (epoch 3 of 4 is at 100%)
    assert lrs["finetune"] == pytest.approx([0.1, 0.1, 0.1 * (1 - 0.25 / 0.4 * 0.99), 0.001])
    assert lrs["fine_pruning"] == pytest.approx([0.1, 0.085355, 0.05, 0.014645], abs=1e-6)
