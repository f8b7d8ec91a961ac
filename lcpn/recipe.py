"""The training recipe's small pieces, shared by both modes: seeding, class weights, the
learning-rate schedule, the input data config, and the versions recorded with a node.

Imbalance: the loss weights each class by 1/sqrt(its share of the node's train images), capped
at 10 times the weight of the largest class and normalised so the average weight per image is 1.
Full inverse-frequency weights (or oversampling) would repeat a 2-image class dozens of times per
epoch and overfit it; the square root lifts rare classes without letting them dominate.
"""

from __future__ import annotations

import math
import platform
import random
from collections.abc import Callable

import numpy as np
import torch
import torchvision

from . import __version__, backbones
from .config import TrainConfig
from .transforms import DataConfig


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def class_weights(counts: list[int], max_ratio: float = 10.0) -> torch.Tensor:
    """1/sqrt(frequency) per class, at most ``max_ratio`` times the weight of the largest class,
    scaled so the mean weight over the training images is 1.

    The cap matters for classes of one or two images: uncapped, a 1-image class next to a
    6,000-image one weighs 80 times more and the head learns to predict it everywhere.
    """
    c = torch.tensor(counts, dtype=torch.float32)
    floor = c.max() / max_ratio**2
    w = torch.where(c > 0, torch.maximum(c, floor).rsqrt(), torch.zeros_like(c))
    return w * c.sum() / (w * c).sum()


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """The learning-rate factor per step: linear warm-up to 1, then cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def data_config_for(config: TrainConfig) -> DataConfig:
    spec = backbones.spec(config.backbone)
    return DataConfig(config.image_size or spec.image_size, spec.mean, spec.std, config.square)


def versions() -> dict[str, str]:
    return {
        "lcpn": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }  # fmt: skip
