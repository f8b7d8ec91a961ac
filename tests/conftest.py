"""Tiny image trees built in tmp_path: real files, a few pixels each, each one distinct."""

from __future__ import annotations

import importlib
import itertools
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image, ImageDraw

_counter = itertools.count()
SCRIPTS = Path(__file__).parents[1] / "scripts"


def import_script(name: str) -> ModuleType:
    """A module of scripts/, imported as its scripts import each other (scripts/ first on the path)."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def hash_bits(a: str, b: str) -> int:
    """How many bits two perceptual hashes (hex) differ in."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


def product_photo(colour: tuple[int, int, int]) -> Image.Image:
    """A catalogue-like photo: one shape on a white ground (192x256); other colours keep its perceptual hash near."""
    picture = Image.new("RGB", (192, 256), "white")
    draw = ImageDraw.Draw(picture)
    draw.ellipse((32, 42, 160, 204), fill=colour)
    draw.rectangle((76, 204, 116, 247), fill=(60, 40, 20))
    return picture


def write_image(path: Path, colour: tuple[int, int, int] | None = None, size: int = 8) -> Path:
    """A small JPEG or PNG (by suffix) whose bytes differ from every other one written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = next(_counter)
    rng = np.random.default_rng(n)
    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    if colour is not None:
        arr[:] = colour
        arr[0, 0] = (n % 256, (n // 256) % 256, 7)  # keep the bytes unique
    Image.fromarray(arr, "RGB").save(path)
    return path


def make_tree(root: Path, leaves: dict[str, int], suffix: str = ".png") -> Path:
    """Create ``root/<leaf path>/img_<i><suffix>`` for every leaf and count."""
    for leaf, count in leaves.items():
        for i in range(count):
            write_image(root / leaf / f"img_{i}{suffix}")
    return root


@pytest.fixture
def tree3(tmp_path: Path) -> Path:
    """A depth-3 tree with a constant node and the same class name under two parents."""
    return make_tree(
        tmp_path / "data",
        {
            "a/x/p": 10,
            "a/x/q": 10,
            "a/y": 10,
            "b/x": 10,
            "b/z": 10,
            "c/only": 6,
        },
    )


FAST = ["--image-size", "32", "--batch-size", "8", "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="session")
def split(tmp_path_factory):
    """A prepared depth-3 split with a constant node (c) and two trainable levels under a."""
    from lcpn.prepare import prepare
    from lcpn.sources import scan_tree

    root = tmp_path_factory.mktemp("data")
    make_tree(root, {"a/x/p": 8, "a/x/q": 8, "a/y": 8, "b/u": 8, "b/v": 8, "c/only": 6}, suffix=".jpg")
    out = tmp_path_factory.mktemp("split")
    prepare(*scan_tree(root), out, str(root), val=0.25, test=0.15)
    return out


@pytest.fixture(scope="session")
def finetuned(split, tmp_path_factory):
    """Every node of ``split`` trained for one epoch in finetune mode (Lite0 at 32 px)."""
    from lcpn.config import TrainConfig
    from lcpn.train import train_nodes

    out = tmp_path_factory.mktemp("finetuned")
    config = TrainConfig(backbone="efficientnet-lite0", image_size=32, epochs=1, batch_size=8, workers=0, device="cpu")
    train_nodes(split, out, config)
    return out
