#!/usr/bin/env python3
"""Draw the small synthetic fashion catalogue in ``dataset_example/``.

Every leaf class has its own silhouette (a t-shirt, trousers, a boot, ...) drawn with Pillow, then
varied in colour, size, position, rotation, background and noise, so a classifier has something
real to learn while the whole set stays small enough to commit. A fixed seed makes the output
the same on every run.

    python scripts/make_dataset_example.py [--out dataset_example] [--per-leaf 50] [--seed 0]
"""

from __future__ import annotations

import argparse
import colorsys
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CANVAS = 256  # the item is drawn upright at this size, then transformed
SIZE = 128  # size of the saved pictures

Draw = Callable[[ImageDraw.ImageDraw, tuple, tuple], None]


def _poly(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(x * CANVAS, y * CANVAS) for x, y in points]


def _box(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
    return (x0 * CANVAS, y0 * CANVAS, x1 * CANVAS, y1 * CANVAS)


def tshirt(d: ImageDraw.ImageDraw, fill: tuple, detail: tuple) -> None:
    d.polygon(
        _poly(
            [
                (0.3, 0.15),
                (0.42, 0.1),
                (0.58, 0.1),
                (0.7, 0.15),
                (0.9, 0.3),
                (0.8, 0.42),
                (0.7, 0.36),
                (0.7, 0.9),
                (0.3, 0.9),
                (0.3, 0.36),
                (0.2, 0.42),
                (0.1, 0.3),
            ]
        ),
        fill=fill,
    )
    d.arc(_box(0.42, 0.04, 0.58, 0.18), 0, 180, fill=detail, width=5)


def longsleeve(d: ImageDraw.ImageDraw, fill: tuple, detail: tuple) -> None:
    d.polygon(
        _poly(
            [
                (0.3, 0.15),
                (0.42, 0.1),
                (0.58, 0.1),
                (0.7, 0.15),
                (0.93, 0.78),
                (0.82, 0.83),
                (0.7, 0.42),
                (0.7, 0.9),
                (0.3, 0.9),
                (0.3, 0.42),
                (0.18, 0.83),
                (0.07, 0.78),
            ]
        ),
        fill=fill,
    )
    d.line(_poly([(0.5, 0.14), (0.5, 0.9)]), fill=detail, width=4)


def trousers(d: ImageDraw.ImageDraw, fill: tuple, detail: tuple) -> None:
    d.polygon(
        _poly([(0.3, 0.1), (0.7, 0.1), (0.76, 0.92), (0.57, 0.92), (0.5, 0.38), (0.43, 0.92), (0.24, 0.92)]),
        fill=fill,
    )
    d.rectangle(_box(0.3, 0.1, 0.7, 0.15), fill=detail)


def skirt(d: ImageDraw.ImageDraw, fill: tuple, detail: tuple) -> None:
    d.polygon(_poly([(0.38, 0.2), (0.62, 0.2), (0.85, 0.8), (0.15, 0.8)]), fill=fill)
    d.rectangle(_box(0.37, 0.17, 0.63, 0.24), fill=detail)


def boot(d: ImageDraw.ImageDraw, fill: tuple, detail: tuple) -> None:
    d.polygon(_poly([(0.32, 0.08), (0.58, 0.08), (0.58, 0.58), (0.86, 0.68), (0.88, 0.84), (0.32, 0.84)]), fill=fill)
    d.rectangle(_box(0.3, 0.84, 0.9, 0.9), fill=detail)


def sneaker(d: ImageDraw.ImageDraw, fill: tuple, detail: tuple) -> None:
    d.polygon(_poly([(0.12, 0.48), (0.42, 0.42), (0.58, 0.54), (0.86, 0.6), (0.9, 0.72), (0.12, 0.72)]), fill=fill)
    d.rectangle(_box(0.1, 0.72, 0.92, 0.8), fill=detail)
    for x in (0.35, 0.42, 0.49):
        d.line(_poly([(x, 0.47), (x + 0.05, 0.56)]), fill=detail, width=4)


def handbag(d: ImageDraw.ImageDraw, fill: tuple, detail: tuple) -> None:
    d.arc(_box(0.32, 0.18, 0.68, 0.62), 180, 360, fill=detail, width=10)
    d.polygon(_poly([(0.22, 0.42), (0.78, 0.42), (0.86, 0.86), (0.14, 0.86)]), fill=fill)


def backpack(d: ImageDraw.ImageDraw, fill: tuple, detail: tuple) -> None:
    d.ellipse(_box(0.4, 0.06, 0.6, 0.2), outline=detail, width=7)
    d.rounded_rectangle(_box(0.26, 0.14, 0.74, 0.9), radius=0.14 * CANVAS, fill=fill)
    d.rounded_rectangle(_box(0.34, 0.55, 0.66, 0.82), radius=0.05 * CANVAS, fill=detail)


def hat(d: ImageDraw.ImageDraw, fill: tuple, detail: tuple) -> None:
    d.ellipse(_box(0.06, 0.58, 0.94, 0.76), fill=fill)
    d.rounded_rectangle(_box(0.3, 0.26, 0.7, 0.68), radius=0.1 * CANVAS, fill=fill)
    d.rectangle(_box(0.3, 0.54, 0.7, 0.62), fill=detail)


# Leaf path -> silhouette. `accessories` has a single child (a constant node in the model) and
# `apparel/tops` makes one branch a level deeper than the others.
LEAVES: dict[str, Draw] = {
    "apparel/tops/tshirt": tshirt,
    "apparel/tops/longsleeve": longsleeve,
    "apparel/trousers": trousers,
    "apparel/skirt": skirt,
    "footwear/boot": boot,
    "footwear/sneaker": sneaker,
    "bags/handbag": handbag,
    "bags/backpack": backpack,
    "accessories/hat": hat,
}


def _colour(rng: np.random.Generator, light: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.2, 0.9), light)
    return (int(r * 255), int(g * 255), int(b * 255))


def render(draw: Draw, rng: np.random.Generator) -> Image.Image:
    """One picture: the item in a random colour, size, place and angle on a noisy background."""
    dark_item = rng.random() < 0.7
    fill = _colour(rng, rng.uniform(0.15, 0.45) if dark_item else rng.uniform(0.75, 0.95))
    detail = tuple(int(c * 0.5) for c in fill)
    item = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
    draw(ImageDraw.Draw(item), fill + (255,), detail + (255,))
    item = item.rotate(rng.uniform(-20, 20), resample=Image.BICUBIC)
    side = int(SIZE * rng.uniform(0.6, 0.95))
    item = item.resize((side, side), Image.LANCZOS)

    bg_light = rng.uniform(0.8, 1.0) if dark_item else rng.uniform(0.2, 0.45)
    top, bottom = np.array(_colour(rng, bg_light)), np.array(_colour(rng, bg_light))
    ramp = np.linspace(0, 1, SIZE)[:, None, None]
    background = (top * (1 - ramp) + bottom * ramp) * np.ones((SIZE, SIZE, 3))
    canvas = Image.fromarray(background.astype(np.uint8), "RGB")
    x, y = (int(v) for v in rng.integers(0, SIZE - side + 1, size=2))
    canvas.paste(item, (x, y), item)
    canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))
    noisy = np.asarray(canvas, dtype=np.float32) + rng.normal(0, rng.uniform(2, 8), (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def make(out: Path, per_leaf: int, seed: int) -> int:
    rng = np.random.default_rng(seed)
    for leaf in LEAVES:
        top = out / leaf.split("/")[0]
        if top.exists():
            shutil.rmtree(top)
    written = 0
    for leaf, draw in LEAVES.items():
        folder = out / leaf
        folder.mkdir(parents=True, exist_ok=True)
        name = leaf.rsplit("/", 1)[-1]
        for i in range(per_leaf):
            render(draw, rng).save(folder / f"{name}_{i:03d}.jpg", quality=80, optimize=True)
            written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "dataset_example")
    parser.add_argument("--per-leaf", type=int, default=50, help="pictures per leaf class")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n = make(args.out, args.per_leaf, args.seed)
    size = sum(p.stat().st_size for p in args.out.rglob("*.jpg"))
    print(f"wrote {n} images ({size / 1e6:.1f} MB) to {args.out}")


if __name__ == "__main__":
    main()
