"""Safe image opening: every file either opens as an RGB picture or yields a reason why not."""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Images larger than this many pixels are refused before they are decoded (decompression bombs).
MAX_PIXELS = 64_000_000
# Folder entries that are never images and never worth a warning (macOS and Windows leftovers).
IGNORED_NAMES = {"Thumbs.db", "desktop.ini"}
# File name endings of the usual image formats, for telling image files (and folders named like them) apart.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}

# Pillow warns above its own limit (about 89 million pixels), well past MAX_PIXELS, so its warning
# would only ever precede a refusal that is reported per file. It is silenced once, here: a
# warnings.catch_warnings() block per image would swap the process-wide filters under other threads.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# A JPEG marker: FF then a code; not a stuffed 00, a restart marker (D0-D7) or a fill byte FF.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_END_OF_IMAGE = 0xD9
_WITHOUT_LENGTH = {0x01, 0xD8}  # TEM and start of image stand alone; every other segment has a length


class ImageError(Exception):
    """A file that cannot be used as an image; the message says why in a few words."""


class ImageTooLarge(ImageError):
    """An image with more pixels than anyone should decode (a decompression bomb)."""


def is_hidden(path: Path) -> bool:
    """Hidden files and AppleDouble files (``.DS_Store``, ``._x.jpg``) are skipped silently."""
    return path.name.startswith(".") or path.name in IGNORED_NAMES


def read_file(path: str | Path) -> bytes:
    """The bytes of an image file; ImageError when the file cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read file ({exc.strerror or exc})") from None


def open_rgb(source: str | Path | bytes) -> Image.Image:
    """Open an image file, or its bytes (an upload), as a decoded RGB picture with its EXIF orientation applied.

    Raises ImageError for missing, empty, non-image, truncated, undecodable and oversized images.
    """
    data = source if isinstance(source, bytes) else read_file(source)
    if not data:
        raise ImageError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise ImageTooLarge(f"decompression bomb ({w}x{h} pixels, limit {MAX_PIXELS})")
            im.load()
            if im.format == "JPEG" and _jpeg_cut_short(data):
                raise ImageError("truncated image")
            return _to_rgb(ImageOps.exif_transpose(im))
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge("decompression bomb (too many pixels)") from None
    except OSError as exc:
        text = str(exc)
        reason = "truncated image" if "truncated" in text.lower() else f"undecodable image ({text})"
        raise ImageError(reason) from None
    except (ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(f"undecodable image ({exc})") from None


def _jpeg_cut_short(data: bytes) -> bool:
    """True when a JPEG's data ends before its end-of-image marker.

    libjpeg decodes a file cut inside its last scan with only a warning, filling the rest grey. The
    walk goes marker by marker from the start: segments are skipped by their length (so an EXIF
    thumbnail inside APP1 is never mistaken for the end), and in a scan's entropy-coded data FF is
    only ever followed by 00, a restart marker or the next marker. Whatever follows the end of image
    (a Motion Photo's video, an appended thumbnail) is not looked at.
    """
    pos = 2  # after the start-of-image marker
    while (marker := _NEXT_MARKER.search(data, pos)) is not None:
        pos = marker.end()
        code = data[pos - 1]
        if code == _END_OF_IMAGE:
            return False
        if code not in _WITHOUT_LENGTH:
            pos += int.from_bytes(data[pos : pos + 2], "big")
    return True


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
