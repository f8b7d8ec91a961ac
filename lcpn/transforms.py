"""Train and eval transforms from a small data config (image size, mean, std, how to make a square).

How a picture becomes the network's square input is part of the model: ``squash`` stretches it
(the catalogue's own thumbnails are stretched squares, so its photos match what the models saw),
``letterbox`` pads it with white to a square first (a product's proportions are kept), and
``crop`` keeps the centre square. The choice is stored in every node's ``node.json`` so that
prediction does what training did.

Plain torchvision transform objects, so they pickle into ``bin/`` and load back through the
restricted unpickler in ``artefacts``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from PIL import Image, ImageOps
from torchvision import transforms as T

SQUARE_MODES = ("squash", "letterbox", "crop")
# Training crops of the eval square: 80-100% of its area, near-square, so the product stays whole.
TRAIN_CROP_SCALE = (0.8, 1.0)
TRAIN_CROP_RATIO = (0.9, 1 / 0.9)


@dataclass(frozen=True)
class DataConfig:
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    square: str = "squash"  # one of SQUARE_MODES

    def __post_init__(self) -> None:
        if self.square not in SQUARE_MODES:
            raise ValueError(f"unknown square mode '{self.square}'; choose one of {', '.join(SQUARE_MODES)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DataConfig:
        # Folders written before the square mode was recorded squashed.
        return cls(int(d["image_size"]), tuple(d["mean"]), tuple(d["std"]), d.get("square", "squash"))


class PadToSquare:
    """Pads a picture with white (a product photo's usual background) to a centred square."""

    def __call__(self, image: Image.Image) -> Image.Image:
        side = max(image.size)
        return ImageOps.pad(image, (side, side), color=(255, 255, 255))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _to_square(cfg: DataConfig) -> list:
    size = cfg.image_size
    if cfg.square == "letterbox":
        return [PadToSquare(), T.Resize((size, size), antialias=True)]
    if cfg.square == "crop":
        return [T.Resize(size, antialias=True), T.CenterCrop(size)]
    return [T.Resize((size, size), antialias=True)]


def eval_transform(cfg: DataConfig) -> T.Compose:
    return T.Compose([*_to_square(cfg), T.ToTensor(), T.Normalize(list(cfg.mean), list(cfg.std))])


def train_transform(cfg: DataConfig, augment: bool = True) -> T.Compose:
    """The eval square (``_to_square``), then mild augmentation that keeps the whole product in view.

    Training starts from the very square prediction sees, so both see the same geometry: the
    eval transform squashes (or pads, or centre-crops) the whole picture, and crops of 60% of the
    raw picture taught fine-tuned networks a framing they never met at prediction time.
    """
    if not augment:
        return eval_transform(cfg)
    return T.Compose(
        [
            *_to_square(cfg),
            T.RandomResizedCrop(cfg.image_size, scale=TRAIN_CROP_SCALE, ratio=TRAIN_CROP_RATIO, antialias=True),
            T.RandomHorizontalFlip(),
            T.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1),
            T.ToTensor(),
            T.Normalize(list(cfg.mean), list(cfg.std)),
        ]
    )


class Mirrored:
    """A transform of the picture's mirror image (test flips): a class, so that it pickles into worker processes."""

    def __init__(self, transform: T.Compose) -> None:
        self.transform = transform

    def __call__(self, image: Image.Image):
        return self.transform(ImageOps.mirror(image))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r})"


def inv_normalize(cfg: DataConfig) -> T.Normalize:
    """Maps a normalised tensor back to [0, 1] pixels, for showing what the network saw."""
    return T.Normalize([-m / s for m, s in zip(cfg.mean, cfg.std)], [1 / s for s in cfg.std])
