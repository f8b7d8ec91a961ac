"""Where and how networks run (device, bf16 autocast), and the frozen shared backbone.

Both training (features mode embeds with it) and inference (heads read its embeddings) use these,
so they live apart from either side.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from . import backbones
from .transforms import DataConfig, eval_transform


@dataclass
class Runtime:
    """Where and how the networks run: device, and bf16 autocast (CPU/CUDA) when asked for."""

    device: torch.device
    bf16: bool = False

    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def run(self, network: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self.autocast():
            return network(x).float()


@dataclass
class SharedBackbone:
    """The frozen backbone that features-mode heads share: one pass per image, cached."""

    name: str
    embedder: backbones.Embedder
    data: DataConfig
    runtime: Runtime

    def __post_init__(self) -> None:
        self.transform = eval_transform(self.data)

    def embed(self, images: list[Any]) -> torch.Tensor:
        return self.runtime.run(self.embedder, torch.stack([self.transform(im) for im in images])).cpu()
