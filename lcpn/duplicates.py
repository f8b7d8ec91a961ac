"""Near-duplicate pictures: a 64-bit perceptual hash, and the pairs of hashes within a distance.

The hash is pHash from the ``imagehash`` package: the 64 lowest frequencies of a 32x32 greyscale
thumbnail's cosine transform, each compared with their median. It was chosen over dHash (the
gradient of a 9x8 thumbnail) because it is steadier under re-encoding: on the 450 pictures of
``dataset_example``, a JPEG re-encode at quality 40 moved dHash by up to 15 bits and pHash by up to
6, a half-size copy by up to 8 and 4. Neither catches a crop (5% off each side: about 8 bits).

A hash reads the picture's grey layout only, and catalogue photos share one: on the 9k fashion
set, 10,684 pairs of hashes lie within ``NEAR_DUPLICATE_BITS``, nearly all of them two products of
a similar shape on the same white ground, and chained they made one group of 1,475 pictures. So a
pair of near hashes is one picture only if the two pictures' colour thumbnails agree as well
(``same_pictures``).
"""

from __future__ import annotations

from collections.abc import Sequence

import imagehash
import numpy as np
from PIL import Image

# Pictures whose hashes differ in this many bits or fewer are taken for one picture. Measured on
# the 450 pictures of dataset_example: every JPEG re-encode at quality 75 and every half- or
# double-size copy stays within 4 bits, and 99.6% of quality-40 re-encodes and of half-size copies
# re-encoded at 75 (within 2 bits: 97.6% and 98.2%). 11 of its 101,025 pairs of different pictures
# (one silhouette drawn in other colours, like the colour variants of one product) come as close;
# grouping them only keeps them on one side of the split. Unrelated hashes are about 32 bits apart.
NEAR_DUPLICATE_BITS = 4
# A colour thumbnail of this many pixels a side, and the largest mean difference (of 255, per pixel
# and channel) of two thumbnails of one picture. Measured on 300 pictures of the 9k fashion set:
# JPEG re-encodes at quality 40 differ by at most 1.02, half-size copies re-encoded at 75 by 1.13,
# 225x300 copies at quality 50 by 1.30 (a quarter-size copy at quality 60: up to 6.8, not caught).
# Of 1,500 sampled pairs of different pictures with near hashes none comes within 2.0, and 6% of the
# pairs of different files with one hash do (mostly one product photographed twice). With 8 pixels
# a side, small products on white (sunglasses) agreed and chained into a group of 99.
THUMBNAIL_SIZE = 16
THUMBNAIL_MAX_DIFFERENCE = 2.0
_THUMBNAIL_PAIRS_PER_BLOCK = 100_000
# Distances computed at once (8 bytes each): bounds the memory whatever the number of hashes.
_DISTANCES_PER_BLOCK = 4_000_000


def perceptual_hash(picture: Image.Image) -> str:
    """The 64-bit pHash of a decoded picture, as 16 hex digits."""
    return str(imagehash.phash(picture))


def thumbnail(picture: Image.Image) -> np.ndarray:
    """The picture as ``THUMBNAIL_SIZE`` x ``THUMBNAIL_SIZE`` RGB pixels (box-filtered, uint8)."""
    rgb = picture if picture.mode == "RGB" else picture.convert("RGB")  # convert() would copy an RGB picture
    small = rgb.resize((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint8)


def same_pictures(thumbnails: np.ndarray, pairs: Sequence[tuple[int, int]]) -> list[bool]:
    """For each ``(i, j)`` of ``pairs``: are ``thumbnails[i]`` and ``thumbnails[j]`` one picture?"""
    flat = thumbnails.reshape(len(thumbnails), -1).astype(np.int16)
    index = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    same: list[bool] = []
    for start in range(0, len(index), _THUMBNAIL_PAIRS_PER_BLOCK):
        i, j = index[start : start + _THUMBNAIL_PAIRS_PER_BLOCK].T
        same.extend((np.abs(flat[i] - flat[j]).mean(axis=1) <= THUMBNAIL_MAX_DIFFERENCE).tolist())
    return same


def near_pairs(
    hashes: Sequence[str], others: Sequence[str] | None = None, max_bits: int = NEAR_DUPLICATE_BITS
) -> list[tuple[int, int]]:
    """Index pairs ``(i, j)`` of hashes at most ``max_bits`` bits apart.

    Without ``others``, pairs within ``hashes`` with ``i < j`` (give distinct hashes: n copies of
    one hash make n * n / 2 pairs); with ``others``, ``hashes[i]`` against ``others[j]``. Every
    distance is computed, in numpy blocks: 10,000 hashes take about half a second.
    """
    a = _as_uint64(hashes)
    b = a if others is None else _as_uint64(others)
    pairs: list[tuple[int, int]] = []
    rows = max(1, _DISTANCES_PER_BLOCK // max(1, len(b)))
    for start in range(0, len(a), rows):
        first = start if others is None else 0  # within one list, only the pairs with j >= i
        distance = np.bitwise_count(a[start : start + rows, None] ^ b[None, first:])
        i, j = np.nonzero(distance <= max_bits)
        i, j = i + start, j + first
        if others is None:
            i, j = i[i < j], j[i < j]
        pairs.extend(zip(i.tolist(), j.tolist()))
    return pairs


def _as_uint64(hashes: Sequence[str]) -> np.ndarray:
    return np.array([int(h, 16) for h in hashes], dtype=np.uint64)
