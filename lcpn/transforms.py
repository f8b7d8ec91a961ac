"""Train and eval transforms from a small data config (image size, mean, std).

Plain torchvision transform objects, so they pickle into ``bin/`` and load back through the
restricted unpickler in ``artefacts``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torchvision import transforms as T


@dataclass(frozen=True)
class DataConfig:
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DataConfig:
        return cls(int(d["image_size"]), tuple(d["mean"]), tuple(d["std"]))


def eval_transform(cfg: DataConfig) -> T.Compose:
    # Squash to a square rather than crop: catalogue photos frame the whole product.
    return T.Compose(
        [
            T.Resize((cfg.image_size, cfg.image_size), antialias=True),
            T.ToTensor(),
            T.Normalize(list(cfg.mean), list(cfg.std)),
        ]
    )


def train_transform(cfg: DataConfig, augment: bool = True) -> T.Compose:
    if not augment:
        return eval_transform(cfg)
    return T.Compose(
        [
            T.RandomResizedCrop(cfg.image_size, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True),
            T.RandomHorizontalFlip(),
            T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
            T.ToTensor(),
            T.Normalize(list(cfg.mean), list(cfg.std)),
        ]
    )


def inv_normalize(cfg: DataConfig) -> T.Normalize:
    """Maps a normalised tensor back to [0, 1] pixels, for showing what the network saw."""
    return T.Normalize([-m / s for m, s in zip(cfg.mean, cfg.std)], [1 / s for s in cfg.std])
