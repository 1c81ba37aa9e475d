"""Batched inference on device-resident uint8 images: one host sync per evaluation, not per
batch. Also where a model is judged stochastic (`is_stochastic`), so that clean accuracy
(`clean_accuracy`, every job's `clean_acc`) and the evasion attacks agree on it.

A *stochastic* model (SAP, a randomized input transform, any third-party module that draws
random numbers in `forward`) gives different outputs for the same input. Its clean accuracy
is the accuracy of its averaged prediction: the argmax of the softmax averaged over
`CLEAN_ACCURACY_PASSES` forward passes, as randomized defenses such as SAP are published.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from bench.context import RunContext
from bench.data import ImageData
from bench.metrics import accuracy

# Forward passes whose softmax is averaged for a stochastic model's clean accuracy.
CLEAN_ACCURACY_PASSES = 10
# Images of the evaluation data that `is_stochastic` runs twice through the model.
STOCHASTIC_PROBE_IMAGES = 16
# Two passes differ when some logit differs by more than this share of the largest logit: a
# margin above float32 rounding noise of non-deterministic GPU kernels.
STOCHASTIC_TOLERANCE = 1e-5


def to_model_input(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] to float in [0, 1]; channels_last on CUDA."""
    x = x_uint8.float().div_(255)
    if x.is_cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Run `model` in eval mode inside the block, restoring its mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def is_stochastic(model: nn.Module, sample: torch.Tensor | None) -> bool:
    """Whether `model` is a stochastic predictor: it declares `stochastic = True`, or two forward
    passes on `sample` (float images in [0, 1], e.g. the first `STOCHASTIC_PROBE_IMAGES`
    evaluation images) differ, run in eval mode (so dropout does not count), without gradients
    and in full precision. Outputs differ when some logit differs by more than
    `STOCHASTIC_TOLERANCE` times the largest one. An empty or missing sample leaves only the
    declared attribute. The two passes draw from the model's random generators like any other
    forward pass."""
    if getattr(model, "stochastic", False):
        return True
    if sample is None or len(sample) == 0:
        return False
    with torch.no_grad(), eval_mode(model):
        first = model(sample).float()
        second = model(sample).float()
    scale = first.abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
    return bool(((first - second).abs().amax() > STOCHASTIC_TOLERANCE * scale).item())


@torch.inference_mode()
def predict(model: nn.Module, x_uint8: torch.Tensor, ctx: RunContext, passes: int = 1) -> torch.Tensor:
    """Predicted classes for all images, computed in batches of `ctx.eval_batch_size`; the
    result stays on the device. With `passes` > 1 each image's prediction is the argmax of its
    softmax averaged over that many forward passes (for stochastic models)."""
    was_training = model.training
    model.eval()
    outputs = []
    with torch.no_grad(), ctx.autocast():
        for start in range(0, len(x_uint8), ctx.eval_batch_size):
            x = to_model_input(x_uint8[start : start + ctx.eval_batch_size])
            if passes == 1:
                outputs.append(model(x).argmax(dim=1))
            else:
                probabilities = sum(model(x).float().softmax(dim=1) for _ in range(passes))
                outputs.append(probabilities.argmax(dim=1))
    model.train(was_training)
    if not outputs:
        return torch.empty(0, dtype=torch.long, device=x_uint8.device)
    return torch.cat(outputs)


def clean_accuracy(model: nn.Module, data: ImageData, ctx: RunContext, passes: int = CLEAN_ACCURACY_PASSES) -> float:
    """Clean accuracy on `data`. A deterministic model is counted on one forward pass; a
    stochastic one (`is_stochastic` on the first `STOCHASTIC_PROBE_IMAGES` images) on the argmax
    of its softmax averaged over `passes` forward passes (default `CLEAN_ACCURACY_PASSES`)."""
    sample = to_model_input(data.x[:STOCHASTIC_PROBE_IMAGES])
    return accuracy(predict(model, data.x, ctx, passes=passes if is_stochastic(model, sample) else 1), data.y)
