"""Training options: one frozen dataclass of defaults; a config file and the command line override it.

The final config is saved in every node's ``node.json`` and in ``hierarchy.json``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MODES = ("finetune", "features")
DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass(frozen=True)
class TrainConfig:
    mode: str = "finetune"  # finetune: a whole network per node; features: shared frozen backbone
    backbone: str = "efficientnet-b4"
    pretrained: bool = True  # ImageNet weights (see backbones); False trains from scratch
    weights: str | None = None  # a local ImageNet checkpoint for the backbone
    image_size: int | None = None  # None: the backbone's own resolution (380 for B4, 224 for Lite0)
    epochs: int = 10  # upper bound; early stopping usually ends sooner
    batch_size: int = 16
    lr: float = 3e-4  # AdamW peak learning rate, reached after the warm-up
    weight_decay: float = 1e-2
    warmup_epochs: float = 1.0  # linear warm-up, then cosine decay to zero
    label_smoothing: float = 0.1
    patience: int = 3  # epochs without a better val accuracy before stopping
    augment: bool = True  # random crops, flips and colour jitter on train images
    device: str = "auto"
    workers: int = 2  # image-decoding worker processes
    seed: int = 0
    head: str = "ensemble"  # features mode: "linear" (logistic regression, L2 chosen on val), "mlp", or
    # "ensemble": both, probabilities averaged (the most accurate in docs/benchmarks.md)
    head_epochs: int = 25  # features mode, mlp head: epochs over the cached embeddings
    mlp_members: int = 3  # features mode: MLPs (different seeds) averaged in an mlp or ensemble head
    refit: bool = True  # features mode, linear head: refit on train + val with the chosen L2 strength
    stage_features: int = 2  # features mode: pooled outputs of the backbone's last N stages join the embedding
    views: int = 2  # features mode: embeddings per training image (1 plain, 2 adds the mirror, 3+ crops)
    precision: str = "auto"  # features mode: backbone precision; auto uses bf16 where the device supports it
    cache: str | None = None  # features mode: embedding cache folder [default: <split>/embeddings]

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def training_key(self) -> dict[str, Any]:
        """The options that change a trained node (not where or how fast it is computed)."""
        skip = {"device", "workers", "cache"}
        return {k: v for k, v in self.to_dict().items() if k not in skip}


FIELDS = {f.name: f for f in fields(TrainConfig)}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a TOML or JSON file (keys as on the command line, with - or _)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot parse the config file '{path}': {exc}") from None
    data = data.get("train", data)  # options may sit under a [train] table
    options = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(options) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} in '{path}'; known options: {', '.join(FIELDS)}")
    return options


def make_config(file_options: dict[str, Any], cli_options: dict[str, Any]) -> TrainConfig:
    """Defaults, then the file, then the command line (options given as None are not set)."""
    merged = {**file_options, **{k: v for k, v in cli_options.items() if v is not None}}
    config = TrainConfig(**merged)
    if config.mode not in MODES:
        raise ValueError(f"unknown mode '{config.mode}'; choose {' or '.join(MODES)}")
    if config.device not in DEVICES:
        raise ValueError(f"unknown device '{config.device}'; choose one of {', '.join(DEVICES)}")
    if config.precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"unknown precision '{config.precision}'; choose auto, bf16 or fp32")
    if config.head not in ("linear", "mlp", "ensemble"):
        raise ValueError(f"unknown head '{config.head}'; choose linear, mlp or ensemble")
    if config.stage_features < 0:
        raise ValueError(f"stage_features must be 0 or more, not {config.stage_features}")
    if config.mlp_members < 1:
        raise ValueError(f"mlp_members must be at least 1, not {config.mlp_members}")
    return config
