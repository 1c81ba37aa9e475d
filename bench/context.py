"""What a plugin gets to run on: the device, seeded random generators, the evaluation batch
size and progress bars. One `RunContext` per job; defenses get a `DefenseContext`, which
knows nothing about the attack."""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from bench.models import TrainRecipe


def derived_seed(seed: int, stream: str) -> int:
    digest = hashlib.sha256(f"{seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class RunContext:
    device: torch.device
    seed: int
    num_classes: int
    eval_batch_size: int = 1024
    horizontal_flip: bool = True  # whether a mirrored image keeps its class (the dataset says)
    show_progress: bool | None = None  # None: only when stderr is a terminal
    # the run's cache folder (`bench run --cache-dir`), for a plugin that keeps files of its own
    cache_dir: Path | None = None

    def generator(self, stream: str) -> torch.Generator:
        """A generator on the job's device, seeded from the job seed and a stream name, so each
        stage draws the same numbers whatever ran before it (exact resume)."""
        return torch.Generator(device=self.device).manual_seed(derived_seed(self.seed, stream))

    def seed_global_rng(self, stream: str) -> None:
        """Seed torch's global generators (weight initialisation, dropout) for one stage."""
        torch.manual_seed(derived_seed(self.seed, stream))

    def progress(self, iterable: Iterable, desc: str, total: int | None = None):
        disable = None if self.show_progress is None else not self.show_progress
        return tqdm(iterable, desc=desc, total=total, leave=False, disable=disable, dynamic_ncols=True)

    def autocast(self):
        """bf16 autocast on CUDA; full precision on the CPU (bf16 there is slow and lossy)."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move a model to the device, in channels_last on CUDA."""
        model = model.to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        return model


@dataclass
class DefenseContext(RunContext):
    """The context a defense runs in: the model family's training recipe (a sensible starting
    point for fine-tuning), and a way to get another model attacked the same way with another
    seed (mode-connectivity endpoints), trained once and cached like any attacked model."""

    recipe: TrainRecipe = field(default_factory=TrainRecipe)
    attacked_model_with_seed: Callable[[int], nn.Module] | None = None
