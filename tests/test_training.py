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
