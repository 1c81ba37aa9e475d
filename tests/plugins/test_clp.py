"""`clp`: the channel Lipschitz bound, the threshold, and conv-BN pairs found in the graph."""

import copy

import pytest
import torch
from torch import nn

import bench
from bench.toolkit import build_plugin
from bench_plugins.defenses.clp import CLP, channel_lipschitz_bounds, conv_bn_pairs
from bench_plugins.testing import backdoored_digits_model


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def hand_made(outlier: bool = True) -> ConvBN:
    torch.manual_seed(0)
    net = ConvBN().eval()
    with torch.no_grad():
        net.conv.weight.normal_(0, 0.1)
        if outlier:
            net.conv.weight[4] *= 30  # one channel with a far larger bound
        net.bn.weight.copy_(torch.tensor([1.0, -1.0, 0.5, 2.0, 1.0, 1.0]))
        net.bn.running_var.copy_(torch.tensor([1.0, 1.0, 0.25, 4.0, 1.0, 9.0]))
    return net


def test_the_bound_is_the_largest_singular_value_times_the_batch_norm_scale():
    net = hand_made()
    expected = [
        torch.linalg.svdvals(net.conv.weight[k].reshape(2, -1)).max()
        * abs(net.bn.weight[k] / torch.sqrt(net.bn.running_var[k] + net.bn.eps))
        for k in range(6)
    ]
    assert channel_lipschitz_bounds(net.conv, net.bn) == pytest.approx(torch.stack(expected).detach(), rel=1e-5)


@pytest.mark.parametrize("outlier, u", [(True, 1.0), (True, 1.5), (False, 0.0), (False, 0.5)])
def test_exactly_the_channels_above_mean_plus_u_std_are_zeroed_in_their_batch_norm(outlier, u):
    net = hand_made(outlier)
    bounds = channel_lipschitz_bounds(net.conv, net.bn)
    threshold = bounds.mean() + u * bounds.std()
    expected = {k for k in range(6) if bounds[k] > threshold}
    assert expected == ({4} if outlier else expected) and (outlier or len(expected) >= 2)
    result = CLP(CLP.Options(u=u)).apply(copy.deepcopy(net), None, None)
    zeroed = {k for k in range(6) if result.model.bn.weight[k] == 0 and result.model.bn.bias[k] == 0}
    assert zeroed == expected and result.values["pruned_channels"] == len(expected)
    kept = set(range(6)) - expected
    assert all(result.model.bn.weight[k] == net.bn.weight[k] for k in kept)
    (layer,) = result.series["clp_layers"]
    assert layer["threshold"] == pytest.approx(threshold.item())


def test_a_batch_norm_is_paired_with_the_convolution_that_feeds_it_not_the_one_registered_before_it():
    """PreAct-ResNet: a block's first batch norm normalises the block's input (a residual sum);
    the module registered just before it is the previous block's shortcut convolution."""
    model = build_plugin("model", "preact_resnet18").build(bench.InputShape(3, 32, 32, 10))
    pairs = dict((bn, conv) for conv, bn in conv_bn_pairs(model))
    registered = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    after_shortcut = [
        registered[i + 1]
        for i, name in enumerate(registered[:-1])
        if "shortcut" in name and isinstance(model.get_submodule(registered[i + 1]), nn.BatchNorm2d)
    ]
    assert after_shortcut, "the architecture has a batch norm registered right after a shortcut conv"
    assert not set(after_shortcut) & set(pairs)  # fed by a sum: no pair, no pruning
    assert pairs["layers.0.bn2"] == "layers.0.conv1" and pairs["layers.0.bn1"] == "conv1"


@pytest.mark.parametrize(
    "name, shape",
    [("small_cnn", (1, 8, 8)), ("preact_resnet18", (3, 32, 32)), ("resnet20", (3, 32, 32)), ("vgg16_bn", (3, 32, 32))],
)
def test_clp_runs_on_every_built_in_model(name, shape):
    from bench.models import Classifier

    torch.manual_seed(0)
    net = build_plugin("model", name).build(bench.InputShape(*shape, 10))
    model = Classifier(net, (0.0,) * shape[0], (1.0,) * shape[0]).eval()
    CLP().check_model(model, torch.zeros(2, *shape))
    result = CLP(CLP.Options(u=0.5)).apply(model, None, None)
    assert result.values["pruned_channels"] > 0
    assert model(torch.rand(2, *shape)).isfinite().all()


def test_on_a_backdoored_model_a_lower_u_prunes_more_and_the_data_free_defense_reads_no_images(one_cpu_thread):
    b = backdoored_digits_model(epochs=8)
    empty = b.bonafide.subset(torch.arange(0))
    counts = [
        CLP(CLP.Options(u=u)).apply(copy.deepcopy(b.model), empty, b.ctx).values["pruned_channels"] for u in (3, 1)
    ]
    assert counts[0] <= counts[1] and counts[1] > 0
