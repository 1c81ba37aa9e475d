import pytest
import torch
from torch import nn

from bench import BenchError, ImageData, RunContext
from bench_plugins.testing import run_suite_file, write_suite
from bench_plugins.attacks.badnets import BadNets, Corner, stamp_trigger

CPU = RunContext(device=torch.device("cpu"), seed=0, num_classes=10)


@pytest.mark.parametrize(
    "corner, margin, rows, cols",
    [
        # 8x10 images (not square, so rows and columns cannot be swapped unnoticed), a 3-pixel trigger
        (Corner.BOTTOM_RIGHT, 1, (4, 7), (6, 9)),
        (Corner.BOTTOM_LEFT, 1, (4, 7), (1, 4)),
        (Corner.TOP_RIGHT, 1, (1, 4), (6, 9)),
        (Corner.TOP_LEFT, 1, (1, 4), (1, 4)),
        (Corner.BOTTOM_RIGHT, 0, (5, 8), (7, 10)),
    ],
)
def test_trigger_sets_exactly_its_square_to_the_trigger_value_and_nothing_else(corner, margin, rows, cols):
    x = torch.randint(0, 256, (2, 3, 8, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    original = x.clone()
    out = stamp_trigger(x, size=3, corner=corner, margin=margin, value=7)
    square = torch.zeros(8, 10, dtype=torch.bool)
    square[rows[0] : rows[1], cols[0] : cols[1]] = True
    assert out[..., square].eq(7).all()  # every channel of every image
    assert torch.equal(out[..., ~square], x[..., ~square])
    assert torch.equal(x, original)  # the input is not modified


def test_a_trigger_that_does_not_fit_is_refused_and_one_that_just_fits_is_not():
    x = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    assert stamp_trigger(x, size=7, corner=Corner.TOP_LEFT, margin=1, value=255)[0, 0, 1:, 1:].eq(255).all()
    with pytest.raises(BenchError, match="does not fit"):
        stamp_trigger(x, size=8, corner=Corner.TOP_LEFT, margin=1, value=255)


def digit_like_data(count=100):
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 200, (count, 1, 8, 8), dtype=torch.uint8, generator=gen)
    return ImageData(images, torch.arange(count) % 10)


def test_poisoning_stamps_and_relabels_round_rate_times_n_non_target_images():
    train = digit_like_data()
    original = ImageData(train.x.clone(), train.y.clone())
    options = BadNets.Options(
        poison_rate=0.137,
        target_class=3,
        trigger_size=2,
        trigger_corner=Corner.TOP_LEFT,
        trigger_margin=0,
        trigger_value=9,
    )
    poisoned, state = BadNets(options).poison(train, CPU)
    idx = state["poisoned_indices"]
    assert len(idx) == len(idx.unique()) == 14  # round(13.7), not truncated
    assert (train.y[idx] != 3).all()
    assert (poisoned.y[idx] == 3).all()
    assert torch.equal(poisoned.x[idx], stamp_trigger(train.x[idx], 2, Corner.TOP_LEFT, 0, 9))  # the options' trigger
    untouched = torch.ones(100, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(poisoned.x[untouched], train.x[untouched])
    assert torch.equal(poisoned.y[untouched], train.y[untouched])
    assert torch.equal(train.x, original.x) and torch.equal(train.y, original.y)  # the input is not modified


def test_poisoned_images_are_a_seeded_draw_among_all_non_target_images():
    train = digit_like_data()
    attack = BadNets(BadNets.Options(poison_rate=0.2, target_class=3))

    def drawn(seed):
        return attack.poison(train, RunContext(torch.device("cpu"), seed, 10))[1]["poisoned_indices"].tolist()

    assert drawn(0) == drawn(0)
    assert drawn(0) != drawn(1)  # drawn at random, not the first non-target images
    _, state = BadNets(BadNets.Options(poison_rate=0.9, target_class=3)).poison(train, CPU)
    assert state["poisoned_indices"].tolist() == [i for i in range(100) if i % 10 != 3]  # all 90 outside the target
    with pytest.raises(BenchError, match="only 90 training images are outside the target class"):
        BadNets(BadNets.Options(poison_rate=0.91, target_class=3)).poison(train, CPU)


class TriggerReader(nn.Module):
    """Reads the class off a flat image (pixel value 10 x class); when `backdoored`, answers
    `target` for any image whose pixel one in from the bottom-right corner is white."""

    def __init__(self, backdoored: bool, target: int):
        super().__init__()
        self.backdoored, self.target = backdoored, target

    def forward(self, x):
        predicted = torch.round(x[:, 0, 0, 0] * 255 / 10).long()
        if self.backdoored:
            predicted = torch.where(x[:, 0, -2, -2] == 1.0, self.target, predicted)
        return nn.functional.one_hot(predicted, 10).float()


def test_evaluation_stamps_the_trigger_on_the_non_target_test_images():
    labels = torch.arange(20) % 10
    test = ImageData((labels * 10).to(torch.uint8).view(20, 1, 1, 1).expand(20, 1, 8, 8).contiguous(), labels)
    attack = BadNets(BadNets.Options(target_class=4, trigger_size=1, trigger_margin=1))
    assert attack.evaluate(TriggerReader(backdoored=True, target=4), test, CPU, {}) == {"asr": 1.0, "ra": 0.0}
    assert attack.evaluate(TriggerReader(backdoored=False, target=4), test, CPU, {}) == {"asr": 0.0, "ra": 1.0}


def test_badnets_implants_a_backdoor_that_a_clean_model_does_not_have(tmp_path, one_cpu_thread):
    # The same suite with poison rate 0.1 and 0 (a clean model, the same trigger at test time).
    attacks = [{"name": "badnets", "poison_rate": [0.1, 0.0], "trigger_size": 2}]
    suite = write_suite(tmp_path / "s.toml", training={"epochs": 4}, attacks=attacks, defenses=["none"])
    rows = run_suite_file(suite, tmp_path)
    assert [row["error"] for row in rows if row["status"] != "ok"] == []
    by_rate = {row["config"]["attack"]["options"]["poison_rate"]: row["metrics"] for row in rows}
    poisoned, clean = by_rate[0.1], by_rate[0.0]
    assert poisoned["asr"] > 0.9 and poisoned["ra"] < 0.1  # triggered digits go to the target
    assert clean["asr"] < 0.05 and clean["ra"] > 0.8  # a clean model mostly ignores the patch
    assert poisoned["clean_acc"] > 0.9 and clean["clean_acc"] > 0.9  # the backdoor is stealthy
