"""Where and how networks run (device, bf16 autocast), and the frozen shared backbone.

Both training (features mode embeds with it) and inference (heads read its embeddings) use these,
so they live apart from either side.
"""

from __future__ import annotations

import contextlib
import hashlib
import pickle
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from . import backbones
from .transforms import DataConfig, Mirrored, eval_transform


def pixels_key(transform: Callable) -> tuple[str, str]:
    """The key of a transform's output among a batch's per-image inputs: equal transforms share it."""
    return ("pixels", hashlib.sha256(pickle.dumps(transform)).hexdigest())


@dataclass
class Runtime:
    """Where and how the networks run: device, and bf16 autocast (CPU/CUDA) when asked for."""

    device: torch.device
    bf16: bool = False

    @property
    def precision(self) -> str:
        """``"bf16"`` or ``"fp32"``, as artefacts record it."""
        return "bf16" if self.bf16 else "fp32"

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
    test_flips: bool = False  # heads also read each picture's mirror image; their probabilities are averaged

    def __post_init__(self) -> None:
        self.transform = eval_transform(self.data)
        self.mirrored = Mirrored(self.transform)

    def per_image(self) -> dict[Hashable, Callable]:
        """The pixels the embedding reads, by key: the eval transform, and its mirror image with test flips."""
        views = [self.transform, self.mirrored] if self.test_flips else [self.transform]
        return {pixels_key(t): t for t in views}

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Embeddings of a batch of transformed pictures, on the CPU."""
        return self.runtime.run(self.embedder, pixels).cpu()


def recorded_precision(backbone_config: Mapping[str, Any]) -> str:
    """The precision a shared backbone embedded with when its heads were trained: ``"bf16"`` or ``"fp32"``.

    Read from ``config.precision`` in ``<models>/backbone/node.json``; folders written before it was
    recorded have the older ``config.bf16`` flag instead.
    """
    if backbone_config.get("precision") in ("bf16", "fp32"):
        return backbone_config["precision"]
    return "bf16" if backbone_config.get("bf16") else "fp32"
