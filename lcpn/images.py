"""Safe image opening: every file either opens as an RGB picture or yields a reason why not."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Images larger than this many pixels are refused before they are decoded (decompression bombs).
MAX_PIXELS = 64_000_000
# Folder entries that are never images and never worth a warning (macOS and Windows leftovers).
IGNORED_NAMES = {"Thumbs.db", "desktop.ini"}


class ImageError(Exception):
    """A file that cannot be used as an image; the message says why in a few words."""


def is_hidden(path: Path) -> bool:
    """Hidden files and AppleDouble files (``.DS_Store``, ``._x.jpg``) are skipped silently."""
    return path.name.startswith(".") or path.name in IGNORED_NAMES


def open_rgb(path: str | Path) -> Image.Image:
    """Open any image as a fully decoded RGB picture with its EXIF orientation applied.

    Raises ImageError for missing, empty, non-image, truncated, undecodable and oversized files.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageError(f"cannot read file ({exc.strerror or exc})") from None
    if size == 0:
        raise ImageError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise ImageError(f"decompression bomb ({w}x{h} pixels, limit {MAX_PIXELS})")
                im.load()
                if im.format == "JPEG" and _jpeg_cut_short(path):
                    raise ImageError("truncated image")
                im = ImageOps.exif_transpose(im)
                return _to_rgb(im)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError("decompression bomb (too many pixels)") from None
    except OSError as exc:
        text = str(exc)
        reason = "truncated image" if "truncated" in text.lower() else f"undecodable image ({text})"
        raise ImageError(reason) from None
    except (ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(f"undecodable image ({exc})") from None


def _jpeg_cut_short(path: Path) -> bool:
    """True when the last scan of a JPEG has no end marker after it.

    libjpeg decodes a file cut inside its last scan with only a warning, filling the rest grey.
    FF D9 (end of image) and FF DA (start of scan) never occur inside entropy-coded data, and an
    EXIF thumbnail's markers come before the main scan, so the last FF D9 must follow the last FF DA.
    """
    data = path.read_bytes()
    return data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda")


def check_image(path: str | Path) -> str | None:
    """The reason a file cannot be used as an image, or None when it opens."""
    try:
        open_rgb(path)
    except ImageError as exc:
        return str(exc)
    return None


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: scale to 8 bits by the image's own range instead of clipping.
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = np.zeros_like(arr) if hi == lo else (arr - lo) * (255.0 / (hi - lo))
        return Image.fromarray(scaled.round().astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":
        return Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Transparent pixels become white, the usual background of a product photo.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")
