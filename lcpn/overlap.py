"""Which evaluation images the models were trained on: the same file, or a near-duplicate of one.

A model folder records the split it was trained from (``split`` in its ``hierarchy.json``); that
split's ``images.csv`` lists every image with its side (train / val / test), its SHA-256 and, when
``prepare`` recorded it, a 64-bit perceptual hash (``phash``, 16 hex digits). Train and val images
both shaped the models (val chose the epochs and the heads' settings), so both count; test images
do not. The split keeps no colour thumbnails, so a near hash counts here without the thumbnail
check that ``split`` adds: on catalogue photos the near count is an upper bound.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from . import fsio
from .duplicates import near_pairs, perceptual_hash

SEEN_SIDES = ("train", "val")
PHASH = "perceptual hash"  # the key of each picture's hash among a batch's per-image inputs


class NoTrainingRecord(Exception):
    """The images the models were trained on cannot be known; the message says why."""


@dataclass(frozen=True)
class Fingerprint:
    sha256: str
    phash: str | None = None


@dataclass
class TrainingImages:
    split: Path
    sha256: set[str]
    phash: list[str] | None  # None when the split recorded no perceptual hashes

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
        return cls(split, {r["sha256"] for r in seen}, phash)

    def per_image(self) -> dict[str, Callable[[Image.Image], str]]:
        """What ``fingerprint`` needs of each decoded picture, by key: its perceptual hash if the split has them."""
        return {PHASH: perceptual_hash} if self.phash is not None else {}

    def fingerprint(self, path: str, phash: str | None) -> Fingerprint:
        """What ``count`` compares of one evaluation image (its perceptual hash only if the split has them)."""
        return Fingerprint(fsio.file_sha256(path), phash if self.phash is not None else None)

    def count(self, fingerprints: Sequence[Fingerprint]) -> dict:
        """How many images are training files (``exact``) or near-duplicates of one (``near``)."""
        others = [f for f in fingerprints if f.sha256 not in self.sha256]
        near = 0
        if self.phash and others and others[0].phash is not None:
            near = len({i for i, _ in near_pairs([f.phash for f in others], self.phash)})
        return {"exact": len(fingerprints) - len(others), "near": near, "split": str(self.split),
                "near_checked": self.phash is not None}  # fmt: skip
