import torch

from bench.testing import run_suite_file, write_suite
from bench_plugins.attacks.badnets import BadNets, Corner, stamp_trigger
from bench import RunContext, ImageData


def test_trigger_is_stamped_in_the_chosen_corner_only():
    x = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    out = stamp_trigger(x, size=2, corner=Corner.BOTTOM_RIGHT, margin=1, value=255)
    assert out[0, 0, 5:7, 5:7].eq(255).all()
    assert out.sum() == 4 * 255
    assert x.sum() == 0  # the input is not modified


def test_poisoning_relabels_exactly_the_reported_non_target_images():
    gen = torch.Generator().manual_seed(0)
    train = ImageData(torch.randint(0, 200, (100, 1, 8, 8), dtype=torch.uint8, generator=gen),
                      torch.arange(100) % 10)
    attack = BadNets(BadNets.Options(poison_rate=0.2, target_class=3, trigger_size=2))
    poisoned, state = attack.poison(train, RunContext(device=torch.device("cpu"), seed=0, num_classes=10))
    idx = state["poisoned_indices"]
    assert len(idx) == 20 and (train.y[idx] != 3).all()
    assert (poisoned.y[idx] == 3).all()
    untouched = torch.ones(100, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(poisoned.x[untouched], train.x[untouched])
    assert torch.equal(poisoned.y[untouched], train.y[untouched])


def test_badnets_on_digits_without_defense_succeeds(tmp_path):
    suite = write_suite(tmp_path / "s.toml", training={"epochs": 8}, defenses=["none"])
    (row,) = run_suite_file(suite, tmp_path)
    assert row["status"] == "ok", row["error"]
    assert row["metrics"]["asr"] > 0.9
    assert row["metrics"]["clean_acc"] > 0.85
