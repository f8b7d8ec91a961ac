import io
import re

import numpy as np
from PIL import Image

from lcpn.duplicates import NEAR_DUPLICATE_BITS, near_pairs, perceptual_hash


def distance(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def photo(seed: int) -> Image.Image:
    """A smooth random picture (noise blurred by upscaling), more like a photo than pixel noise."""
    small = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((96, 96), Image.Resampling.BICUBIC)


def test_copies_hash_close_and_other_pictures_far():
    original = photo(0)
    buf = io.BytesIO()
    original.save(buf, "JPEG", quality=60)
    copies = [Image.open(io.BytesIO(buf.getvalue())), original.resize((48, 48)), original.resize((200, 200))]
    h = perceptual_hash(original)
    assert re.fullmatch("[0-9a-f]{16}", h)
    assert all(distance(h, perceptual_hash(c)) <= NEAR_DUPLICATE_BITS for c in copies)
    assert all(distance(h, perceptual_hash(photo(seed))) > NEAR_DUPLICATE_BITS for seed in range(1, 6))


def test_near_pairs_within_one_list_and_between_two():
    hashes = ["0000000000000000", "000000000000000f", "00000000000000ff", "ffffffffffffffff"]
    assert near_pairs(hashes) == [(0, 1), (1, 2)]  # 0 and 2 are 8 bits apart
    assert near_pairs(hashes, max_bits=8) == [(0, 1), (0, 2), (1, 2)]
    assert near_pairs(["fffffffffffffff0", "0000000000000001"], hashes) == [(0, 3), (1, 0), (1, 1)]
    assert near_pairs([]) == [] and near_pairs(hashes, []) == []
