"""Feeding images to the networks: file paths or uploaded bytes in, checked RGB pictures out.

Decoding runs in a thread pool one batch ahead of the networks (PIL releases the GIL while it
decodes). A source that cannot be used yields its own ``ImageError`` in its place; the others go on.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from .errors import LcpnError
from .images import IMAGE_SUFFIXES, ImageError, open_rgb

ImageSource = str | Path | bytes  # a file, or an image's bytes (an upload)


class InputError(LcpnError):
    """None of the inputs named on the command line can be used."""


def source_name(source: ImageSource, index: int) -> str:
    """How a source is named in predictions: its path, or its position for bytes."""
    return f"<bytes #{index + 1}>" if isinstance(source, bytes) else str(source)


def open_source(source: ImageSource) -> Image.Image | ImageError:
    """The source as an RGB picture, or the ``ImageError`` that says why it cannot be one."""
    try:
        return open_rgb(source)
    except ImageError as exc:
        return exc


def feed(
    sources: Sequence[ImageSource], batch_size: int, workers: int | None = None
) -> Iterator[list[Image.Image | ImageError]]:
    """The sources in consecutive batches of ``batch_size``, opened; the next batch decodes meanwhile."""
    chunks = [sources[i : i + batch_size] for i in range(0, len(sources), batch_size)]
    with ThreadPoolExecutor(workers or min(4, os.cpu_count() or 1)) as pool:
        ahead = pool.map(open_source, chunks[0]) if chunks else None
        for i in range(len(chunks)):
            opened = list(ahead)
            if i + 1 < len(chunks):
                ahead = pool.map(open_source, chunks[i + 1])
            yield opened


def collect_images(inputs: Iterable[str | Path]) -> list[str]:
    """The files named, and the image files found recursively in the folders named (sorted, hidden skipped).

    A named path that does not exist stays in the list, to get its own error like any bad image;
    only when none of the inputs exists, or the folders hold no image at all, is it an InputError.
    """
    inputs = [Path(p) for p in inputs]
    if not any(p.exists() for p in inputs):
        raise InputError(f"none of {', '.join(map(str, inputs))} exists")
    out: list[str] = []
    for p in inputs:
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*")
                if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )  # fmt: skip
            out.extend(map(str, found))
        else:
            out.append(str(p))
    if not out:
        raise InputError(f"no image files found in {', '.join(map(str, inputs))}")
    return out
