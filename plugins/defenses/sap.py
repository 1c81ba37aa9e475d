"""`sap`: Stochastic Activation Pruning (Dhillon et al., ICLR 2018), applied to a trained
model without retraining.

After every ReLU, for each example separately: p_j = |h_j| / sum_k |h_k| over the layer's
units (channels x height x width), r = round(frac x units) draws with replacement from
Categorical(p); every unit drawn at least once is kept and scaled by 1 / (1 - (1 - p_j)^r),
the rest are zeroed. The draws are exact (batched inverse-CDF sampling with a guide table,
the law of `torch.multinomial` with replacement, see `draw_units`), not the
independent-Bernoulli shortcut, which has the same marginals but not the same joint law;
since a unit is kept with probability exactly 1 - (1 - p_j)^r, the expected output equals
the unpruned activation.

Finding the ReLUs: the model is traced with `torch.fx`, and a pruning layer is inserted
after every `nn.ReLU` module, every functional `F.relu` / `torch.relu` call and every
`tensor.relu()` method call. Forward hooks would miss the functional calls that
PreAct-ResNet-18 uses; patching `F.relu` globally would not be thread-safe. A model fx
cannot trace (data-dependent control flow) is refused with an error.

The returned predictor declares `stochastic = True` (its passes differ anyway, which
`bench.evaluation.is_stochastic` would detect), so the evasion attacks add EOT-PGD and count
predictions over repeated passes (the honest evaluation of Athalye et al. 2018, under which
SAP falls to about 0% at eps 8/255 on CIFAR-10), and `autoattack` runs its `rand` version.

Predictions are averaged over stochastic passes, as the method is published, at two levels:

- `passes` (default 1): each forward call runs the pruned network that many times and returns
  the log of the mean softmax. Every call, so every gradient an attack takes and every
  prediction it counts, is this averaged predictor; 1 is plain SAP, one draw per call.
- The job's `clean_acc` (`bench.evaluation.clean_accuracy`, for every stochastic model) is the
  argmax of the softmax averaged over `CLEAN_ACCURACY_PASSES` (10) calls, i.e. over
  10 x `passes` draws. The evasion attacks report single-call clean accuracy apart, as the
  diagnostics `clean_acc_one_pass` (the mean over the attack's own `passes` calls) and
  `clean_acc_all_passes` (correct in all of them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import bench

RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)


# Rows of a layer sampled together on the CPU: a chunk's tables stay in cache (the sampler is
# memory-bound there); a GPU takes the whole batch at once.
CPU_CHUNK_ELEMENTS = 1 << 18
# Guide-table buckets per unit: more buckets leave fewer draws to the binary search.
BUCKETS_PER_UNIT = 4


def prune_activations(h: torch.Tensor, frac: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """SAP on a batch of activations h [N, ...]: per example, keep the units drawn in
    round(frac x units) categorical draws with replacement (p proportional to |h|), scaled by
    their inverse keep probability. Computed in float32, returned in h's dtype."""
    flat = h.flatten(1).float()
    rows, units = flat.shape
    draws = max(1, round(frac * units))
    step = rows if flat.device.type != "cpu" else max(1, CPU_CHUNK_ELEMENTS // units)
    # split/cat, not slice assignment: their backward is one cat / views, not a zero-filled
    # full-size gradient per chunk.
    out = torch.cat([prune_rows(part, draws, generator) for part in flat.split(step)])
    return out.view_as(h).to(h.dtype)


def prune_rows(flat: torch.Tensor, draws: int, generator: torch.Generator | None) -> torch.Tensor:
    """`prune_activations` on a [rows, units] float32 block."""
    magnitude = flat.abs()
    total = magnitude.sum(dim=1, keepdim=True).clamp_min(1e-30)
    kept = draw_units(magnitude.detach(), draws, generator)  # the draws carry no gradient
    # 1 - (1 - p)^r, accurate for tiny p; floored so that an all-zero row gives 0 / floor = 0.
    keep_probability = torch.expm1(torch.log1p(magnitude / -total) * draws).neg().clamp_min(1e-30)
    return torch.where(kept, flat / keep_probability, 0)


def draw_units(weights: torch.Tensor, draws: int, generator: torch.Generator | None) -> torch.Tensor:
    """Which units `draws` categorical draws with replacement hit, per row: a bool [rows, units]
    mask. Row i draws unit j with probability weights[i, j] / sum_k weights[i, k] (all-zero
    rows: any unit; their SAP output is zero either way).

    Exact inverse-CDF sampling, batched, with a guide table (Chen & Asau 1974) so that most draws
    need no search. Scale the cumulative weights to [0, B] (B buckets): unit j covers
    [s_(j-1), s_j). A draw is u ~ U[0, B); its unit is the first j with s_j > u. The table gives,
    for bucket b = floor(u), the first unit with s_j >= b, which is the answer unless s_j <= u
    (a unit boundary lies between b and u): those few draws are found by a binary search up to
    the table's entry for b + 1. Same law as
    `torch.multinomial(p, draws, replacement=True)`, several times faster on the CPU."""
    rows, units = weights.shape
    device = weights.device
    buckets = BUCKETS_PER_UNIT * units
    scaled = weights.cumsum(dim=1)
    scaled.mul_(buckets / scaled[:, -1:].clamp_min(1e-30))
    scaled[:, -1] = buckets  # the last unit ends exactly at B, whatever the rounding
    # first[b] = #{j : s_j < b} = #{j : floor(s_j) + 1 <= b}
    first = torch.zeros(rows, buckets + 2, dtype=torch.int32, device=device)
    first.scatter_add_(1, scaled.long().add_(1), torch.ones((), dtype=torch.int32, device=device).expand(rows, units))
    first = first.cumsum_(dim=1, dtype=torch.int32)
    u = torch.rand(rows, draws, generator=generator, device=device).mul_(buckets)
    candidate = first.gather(1, u.long()).long()
    unresolved = scaled.gather(1, candidate) <= u
    # The unresolved draws: binary search between the candidate and the first unit of the next
    # bucket (whose s_j >= b + 1 > u), all at once, on flat indices (index_select is the fast
    # gather here).
    position = unresolved.view(-1).nonzero().squeeze(1)
    row = position // draws
    query = u.view(-1).index_select(0, position)
    low = candidate.view(-1).index_select(0, position) + 1
    high = first.view(-1).index_select(0, row * (buckets + 2) + query.long() + 1).long()
    hit = torch.zeros(rows, units + 1, dtype=torch.bool, device=device)  # column `units`: discarded
    hit.scatter_(1, candidate.masked_fill_(unresolved, units), True)
    if len(position):
        flat, base = scaled.view(-1), row * units
        for _ in range(int((high - low).max()).bit_length()):
            middle = (low + high) // 2
            above = flat.index_select(0, base + middle) > query
            high = torch.where(above, middle, high)
            low = torch.where(above, low, middle + 1)
        hit.view(-1).index_fill_(0, row * (units + 1) + low, True)
    return hit[:, :units]


class ActivationPruning(nn.Module):
    """The SAP layer inserted after a ReLU. `generator` (on the model's device) makes runs
    reproducible; None uses torch's global generator."""

    def __init__(self, frac: float, generator: torch.Generator | None = None):
        super().__init__()
        self.frac = frac
        self.generator = generator

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return prune_activations(h, self.frac, self.generator)

    def extra_repr(self) -> str:
        return f"frac={self.frac}"


def is_relu(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[str(node.target)], nn.ReLU)
    if node.op == "call_function":
        return node.target in RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def insert_pruning(
    model: nn.Module, frac: float, generator: torch.Generator | None
) -> tuple[torch.fx.GraphModule, int]:
    """A traced copy of `model` with an `ActivationPruning` layer after every ReLU; returns it
    and the number of layers inserted (at least one: a model without ReLUs is refused)."""
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception as exc:  # fx raises several types for untraceable code
        raise bench.BenchError(f"sap: cannot trace the model with torch.fx to find its ReLUs ({exc})") from exc
    modules = dict(traced.named_modules())
    relus = [node for node in traced.graph.nodes if is_relu(node, modules)]
    if not relus:
        raise bench.BenchError("sap: the model has no ReLU (nn.ReLU, F.relu, torch.relu or .relu()) to prune after")
    for index, node in enumerate(relus):
        name = f"sap_{index}"
        traced.add_submodule(name, ActivationPruning(frac, generator))
        with traced.graph.inserting_after(node):
            pruned = traced.graph.call_module(name, (node,))
        node.replace_all_uses_with(pruned, delete_user_cb=lambda user: user is not pruned)
    traced.graph.lint()
    traced.recompile()
    return traced, len(relus)


class StochasticallyPruned(nn.Module):
    """The defended predictor: the pruned network, run `passes` times per call; returns the
    log of the mean softmax (logits of the averaged prediction), or with one pass the pruned
    network's logits."""

    stochastic = True

    def __init__(self, pruned: nn.Module, passes: int):
        super().__init__()
        self.pruned = pruned
        self.passes = passes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.passes == 1:
            return self.pruned(x)
        probabilities = torch.stack([self.pruned(x).float().softmax(dim=1) for _ in range(self.passes)])
        return probabilities.mean(dim=0).clamp_min(1e-12).log()


class SAP(bench.Defense):
    name = "sap"
    description = "Stochastic Activation Pruning after every ReLU (no retraining); a stochastic predictor"
    paper = "https://arxiv.org/abs/1803.01442"
    defender_data = bench.DefenderData.NONE

    @dataclass(frozen=True)
    class Options:
        frac: float = bench.option(
            1.0, "draws per layer as a fraction of its units (1.0: SAP-100)", min=0, max=10, min_exclusive=True
        )
        passes: int = bench.option(
            1,
            "stochastic passes averaged (softmax) in every forward call; 1: plain SAP "
            "(clean_acc still averages 10 calls)",
            min=1,
        )

    def check_model(self, model, sample):
        insert_pruning(model, self.options.frac, None)

    def apply(self, model, bonafide, ctx):
        model.eval()
        pruned, _ = insert_pruning(model, self.options.frac, ctx.generator("sap"))
        return StochasticallyPruned(pruned, self.options.passes).eval()


@bench.hookimpl
def register_defenses(register):
    register(SAP)
