"""Which evaluation images the models were trained on: the same file, or a near-duplicate of one.

A model folder records the split it was trained from (``split`` in its ``hierarchy.json``); that
split's ``images.csv`` lists every image with its side (train / val / test), its SHA-256 and, when
``prepare`` recorded it, a 64-bit perceptual hash (``phash``, 16 hex digits). Train and val images
both shaped the models (val chose the epochs and the heads' settings), so both count; test images
do not. A near hash counts only where the colour thumbnails agree too, as in ``split``: the
training picture's thumbnail is made from its file when a near hash points at it (a file that is
gone or unreadable leaves the hash alone to decide).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from . import fsio
from .duplicates import near_pairs, perceptual_hash, same_pictures, thumbnail
from .images import ImageError, open_rgb

SEEN_SIDES = ("train", "val")
PHASH = "perceptual hash"  # the key of each picture's hash among a batch's per-image inputs
THUMBNAIL = "colour thumbnail"  # and of its duplicates.thumbnail


class NoTrainingRecord(Exception):
    """The images the models were trained on cannot be known; the message says why."""


@dataclass(frozen=True)
class Fingerprint:
    sha256: str
    phash: str | None = None
    thumbnail: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass
class TrainingImages:
    split: Path
    sha256: set[str]
    phash: list[str] | None  # None when the split recorded no perceptual hashes
    paths: list[str] = field(default_factory=list)  # beside phash: where each thumbnail can be made
    _thumbnails: dict[int, np.ndarray | None] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def of_models(cls, models: Path) -> TrainingImages:
        """The train and val images of the split that ``models`` was trained from."""
        try:
            recorded = json.loads((models / "hierarchy.json").read_text(encoding="utf-8")).get("split")
        except (OSError, ValueError) as exc:
            raise NoTrainingRecord(f"'{models / 'hierarchy.json'}' cannot be read ({exc})") from None
        if not isinstance(recorded, str):
            raise NoTrainingRecord(f"'{models / 'hierarchy.json'}' does not record the split it was trained from")
        split = Path(recorded)
        if not (split / "images.csv").is_file():
            raise NoTrainingRecord(f"the split the models were trained from, '{split}', is not there")
        seen = [r for r in fsio.read_csv(split / "images.csv") if r.get("split") in SEEN_SIDES]
        phash = [r["phash"] for r in seen] if seen and all(r.get("phash") for r in seen) else None
        return cls(split, {r["sha256"] for r in seen}, phash, [r["path"] for r in seen])

    def per_image(self) -> dict[str, Callable[[Image.Image], object]]:
        """What ``fingerprint`` needs of each decoded picture, by key: hash and thumbnail if the split has hashes."""
        return {PHASH: perceptual_hash, THUMBNAIL: thumbnail} if self.phash is not None else {}

    def fingerprint(self, path: str, phash: str | None, thumb: np.ndarray | None = None) -> Fingerprint:
        """What ``count`` compares of one evaluation image (hash and thumbnail only if the split has hashes)."""
        if self.phash is None:
            return Fingerprint(fsio.file_sha256(path))
        return Fingerprint(fsio.file_sha256(path), phash, thumb)

    def count(self, fingerprints: Sequence[Fingerprint]) -> dict:
        """How many images are training files (``exact``) or near-duplicates of one (``near``)."""
        others = [f for f in fingerprints if f.sha256 not in self.sha256]
        near = 0
        if self.phash and others and others[0].phash is not None:
            pairs = near_pairs([f.phash for f in others], self.phash)
            near = len({i for i, j in pairs if self._same_picture(others[i], j)})
        return {"exact": len(fingerprints) - len(others), "near": near, "split": str(self.split),
                "near_checked": self.phash is not None}  # fmt: skip

    def _same_picture(self, image: Fingerprint, seen: int) -> bool:
        """Do ``image`` and training image ``seen`` (near hashes) agree in their thumbnails, where both have one?"""
        if seen not in self._thumbnails:
            try:
                self._thumbnails[seen] = thumbnail(open_rgb(self.paths[seen])) if seen < len(self.paths) else None
            except ImageError:
                self._thumbnails[seen] = None
        theirs = self._thumbnails[seen]
        if image.thumbnail is None or theirs is None:
            return True
        return same_pictures(np.stack([image.thumbnail, theirs]), [(0, 1)])[0]
