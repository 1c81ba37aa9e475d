"""Batched inference on device-resident uint8 images: one host sync per evaluation, not per
batch."""

from __future__ import annotations

import torch
from torch import nn

from bench.context import RunContext
from bench.data import ImageData
from bench.metrics import accuracy


def to_model_input(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] to float in [0, 1]; channels_last on CUDA."""
    x = x_uint8.float().div_(255)
    if x.is_cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@torch.inference_mode()
def predict(model: nn.Module, x_uint8: torch.Tensor, ctx: RunContext) -> torch.Tensor:
    """Predicted classes for all images, computed in batches of `ctx.eval_batch_size`; the
    result stays on the device."""
    was_training = model.training
    model.eval()
    outputs = []
    with ctx.autocast():
        for start in range(0, len(x_uint8), ctx.eval_batch_size):
            logits = model(to_model_input(x_uint8[start:start + ctx.eval_batch_size]))
            outputs.append(logits.argmax(dim=1))
    model.train(was_training)
    if not outputs:
        return torch.empty(0, dtype=torch.long, device=x_uint8.device)
    return torch.cat(outputs)


def clean_accuracy(model: nn.Module, data: ImageData, ctx: RunContext) -> float:
    return accuracy(predict(model, data.x, ctx), data.y)
