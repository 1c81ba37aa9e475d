import torch

from bench.training import lr_schedule, random_crop_flip
from bench.models import TrainRecipe


def test_crop_without_padding_or_flip_is_identity():
    x = torch.randint(0, 256, (5, 3, 6, 6), dtype=torch.uint8)
    assert torch.equal(random_crop_flip(x, 0, False, torch.Generator().manual_seed(0)), x)


def test_each_image_is_a_shifted_or_mirrored_window_of_itself():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    out = random_crop_flip(x, 1, True, torch.Generator().manual_seed(3))
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(2):
        windows = [padded[i, :, r:r + 4, c:c + 4] for r in range(3) for c in range(3)]
        windows += [w.flip(-1) for w in windows]
        assert any(torch.equal(out[i], w) for w in windows)


def test_schedule_warms_up_then_decays_to_zero():
    factor = lr_schedule(TrainRecipe(warmup_fraction=0.2), total_steps=10)
    values = [factor(s) for s in range(10)]
    assert values[0] < values[1] == 1.0
    assert values[-1] < values[2] and values[-1] >= 0


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


def test_repair_defenses_take_the_same_number_of_steps_whatever_the_bonafide_size(monkeypatch):
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

    defenses = {"finetune": FineTune(FineTune.Options(epochs=1)),
                "fine_pruning": FinePruning(FinePruning.Options(epochs=1, batch_size=128)),
                "mcr": ModeConnectivityRepair(ModeConnectivityRepair.Options(epochs=1, t_selection=TSelection.FIXED,
                                                                             path_points=2))}
    counted = {}
    for size in (50, 2500):
        generator = torch.Generator().manual_seed(size)
        bonafide = bench.ImageData(torch.randint(0, 256, (size, 1, 8, 8), dtype=torch.uint8, generator=generator),
                                   torch.randint(0, 10, (size,), generator=generator))
        for name, defense in defenses.items():
            ctx = bench.DefenseContext(device=torch.device("cpu"), seed=0, num_classes=10, recipe=SmallCNN.recipe,
                                       attacked_model_with_seed=lambda seed: model())
            steps.clear()
            defense.apply(model(), bonafide, ctx)
            counted[name, size] = len(steps)
    assert counted == {(name, size): 79 for name in defenses for size in (50, 2500)}
