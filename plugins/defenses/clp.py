"""`clp`: Channel Lipschitzness-based Pruning (Zheng, Tang, Li & Liu, ECCV 2022), data-free.

A backdoor tends to be carried by a few channels whose output can grow much more than their
neighbours' for a small change of input (the trigger). CLP bounds each channel's Lipschitz
constant without any data: for a convolution followed by batch norm, output channel k computes
`gamma_k / sigma_k * (W_k * x) + const`, whose Lipschitz constant is at most the largest singular
value of `W_k` (reshaped to in_channels x kernel pixels) times `|gamma_k / sigma_k|` (the
"upper bound of the channel Lipschitz constant", UCLC). In each layer, channels whose UCLC
exceeds the layer's mean + `u` x standard deviation are pruned by zeroing their batch-norm
weight and bias, so they output zero before the nonlinearity.

Pairing: each `BatchNorm2d` is paired with the convolution whose output it normalises, found in
the model's graph (`torch.fx`), not by registration order. BackdoorBench (`defense/clp.py`) and the
authors' code pair a batch norm with the convolution registered just before it, which on
PreAct-ResNet joins a block's first batch norm (which normalises the block's input, a residual
sum) to the previous block's shortcut convolution; here such a batch norm has no convolution
feeding it and is left alone. On networks where every batch norm follows its convolution
(ResNet, VGG-BN, `small_cnn`) the pairs are the same as the reference's.

Defaults: `u` = 3 (BackdoorBench `config/defense/clp/cifar10.yaml` and the paper). The defense
uses no data (`defender_data = none`): it needs only the model's weights and running statistics.

Returns a `bench.Defended`: the pruned model, the value `pruned_channels` (how many, over all
layers) and the series `clp_layers` (per pair: the batch norm's name, its channels, how many
were pruned, the threshold, and the largest UCLC).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

import bench
from bench import BenchError


class CLP(bench.Defense):
    name = "clp"
    description = "Channel Lipschitzness-based Pruning: data-free; prune channels with an outlying Lipschitz bound"
    paper = "https://arxiv.org/abs/2208.03111"
    code = "https://github.com/rkteddy/channel-Lipschitzness-based-pruning"
    defender_data = bench.DefenderData.NONE
    metrics = (
        bench.Metric(
            "pruned_channels",
            "Pruned channels",
            None,
            kind=bench.MetricKind.NUMBER,
            doc="channels CLP zeroed, over all conv-BN pairs",
        ),
    )

    @dataclass(frozen=True)
    class Options:
        u: float = bench.option(
            3.0, "prune channels whose Lipschitz bound exceeds the layer's mean + u x std (reference: 3)", min=0
        )

    def check_model(self, model, sample):
        conv_bn_pairs(model)  # untraceable or without a single pair: refused before the suite runs

    def apply(self, model, data, ctx):
        pairs = conv_bn_pairs(model)
        records, pruned = [], 0
        with torch.no_grad():
            for conv_name, bn_name in pairs:
                conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
                bounds = channel_lipschitz_bounds(conv, bn)
                threshold = bounds.mean() + self.options.u * bounds.std()
                index = (bounds > threshold).nonzero().squeeze(1)
                bn.weight[index] = 0.0
                bn.bias[index] = 0.0
                pruned += len(index)
                records.append(
                    {
                        "layer": bn_name,
                        "channels": len(bounds),
                        "pruned": len(index),
                        "threshold": threshold.item(),
                        "max_bound": bounds.max().item(),
                    }
                )
        return bench.Defended(model, values={"pruned_channels": float(pruned)}, series={"clp_layers": records})


def channel_lipschitz_bounds(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """Per output channel k: the largest singular value of conv weight W_k (as in_channels x
    kernel pixels) times |gamma_k / sqrt(running_var_k + eps)|, batched over channels."""
    weight = conv.weight.detach().float()
    per_channel = weight.reshape(weight.shape[0], weight.shape[1], -1)
    spectral = torch.linalg.matrix_norm(per_channel, ord=2)
    if bn.running_var is None:
        raise BenchError("clp: a batch norm without running statistics has no fixed scale to bound")
    scale = bn.weight.detach().float() / (bn.running_var.detach().float() + bn.eps).sqrt()
    return spectral * scale.abs()


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(convolution, batch norm) module names, for every `BatchNorm2d` (affine, with running
    statistics) whose input is the output of an `nn.Conv2d` with as many output channels, in
    graph order."""
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception as exc:  # fx raises several types for untraceable code
        raise BenchError(f"clp: cannot trace the model with torch.fx to pair convolutions with batch norms ({exc})")
    modules = dict(traced.named_modules())
    pairs = []
    for node in traced.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[str(node.target)], nn.BatchNorm2d):
            continue
        source = node.args[0] if node.args else None
        if not isinstance(source, torch.fx.Node) or source.op != "call_module":
            continue
        conv, bn = modules[str(source.target)], modules[str(node.target)]
        if (
            isinstance(conv, nn.Conv2d)
            and conv.out_channels == bn.num_features
            and bn.affine
            and bn.track_running_stats
        ):
            pairs.append((str(source.target), str(node.target)))
    if not pairs:
        raise BenchError("clp: the model has no batch norm fed directly by a convolution; CLP has nothing to bound")
    return pairs


@bench.hookimpl
def register_defenses(register):
    register(CLP)
