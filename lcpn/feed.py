"""Feeding images to the networks: file paths or uploaded bytes in, batches of prepared inputs out.

The one input pipeline of prediction, evaluation and the features-mode embedding pass. A torch
``DataLoader`` hands whole batches to worker processes: each worker decodes its sources
(``images.open_rgb``) AND runs the caller's ``prepare`` on every picture (the eval transform, a
mirror image, a perceptual hash), then stacks the tensors, so the main process only runs networks.
Pictures themselves never cross a process boundary (a 12-megapixel photo is 36 MB; its 260 px
input is 0.8 MB). Batches stay in order; a source that cannot be used yields its own ``ImageError``
in its place and the rest of its batch goes on. On CUDA the batches come in pinned memory, so that
``Runtime.run``'s ``non_blocking`` copy overlaps the next batch's work.

``workers=0`` prepares in the calling process; a single batch always does (starting a worker would
only add its start-up). Decoding JPEGs on the GPU (``torchvision.io.decode_jpeg(device="cuda")``)
is not built: it cannot be measured or tested without a GPU, and PNG, WebP or CMYK files would
still need this path.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .errors import LcpnError
from .images import IMAGE_SUFFIXES, ImageError, open_rgb

ImageSource = str | Path | bytes  # a file, or an image's bytes (an upload)
# What a worker makes of one opened picture: named inputs; ``index`` is the source's position.
Prepare = Callable[[Image.Image, int], Mapping[Hashable, Any]]
PICTURE = "picture"  # the key under which ``keep_picture`` hands back the decoded picture itself


class InputError(LcpnError):
    """None of the inputs named on the command line can be used."""


def default_workers() -> int:
    """Worker processes when none are asked for: up to 4, never more than the CPU cores; beside a GPU
    all cores but one (for the process that runs the networks), up to 16: one core decodes and
    transforms about 220 of the catalogue's images a second (4.6 ms each, docs/benchmarks.md), and
    a GPU embeds thousands (two workers kept an H100 11% busy fine-tuning)."""
    cores = os.cpu_count() or 1
    return max(1, min(16, cores - 1)) if torch.cuda.is_available() else min(4, cores)


def default_batch_size(device: torch.device) -> int:
    """Images per batch when none are asked for: a GPU needs large batches to stay busy."""
    return 256 if device.type == "cuda" else 32


def source_name(source: ImageSource, index: int) -> str:
    """How a source is named in predictions: its path, or its position for bytes."""
    return f"<bytes #{index + 1}>" if isinstance(source, bytes) else str(source)


def open_source(source: ImageSource) -> Image.Image | ImageError:
    """The source as an RGB picture, or the ``ImageError`` that says why it cannot be one."""
    try:
        return open_rgb(source)
    except ImageError as exc:
        return exc


def keep_picture(picture: Image.Image, index: int) -> dict[str, Image.Image]:
    """The default ``prepare``: the decoded picture itself (in-process use; pictures are large to send)."""
    return {PICTURE: picture}


@dataclass(frozen=True)
class PerImage:
    """A ``prepare`` that applies named functions of the picture alone (transforms, hashes): picklable."""

    functions: Mapping[Hashable, Callable[[Image.Image], Any]]

    def __call__(self, picture: Image.Image, index: int) -> dict[Hashable, Any]:
        return {key: fn(picture) for key, fn in self.functions.items()}


@dataclass
class FedBatch:
    """One batch of sources: the prepared inputs of those that opened, the errors of the others."""

    indices: list[int]  # positions in ``sources``, in order
    errors: dict[int, ImageError] = field(default_factory=dict)  # by position in ``sources``
    # Per key, the opened sources' values in order: one stacked tensor when they are tensors of one shape.
    inputs: dict[Hashable, Any] = field(default_factory=dict)

    @property
    def opened(self) -> list[int]:
        """Positions in ``sources`` of the sources that opened, in order (the rows of ``inputs``)."""
        return [i for i in self.indices if i not in self.errors]

    def pin_memory(self) -> FedBatch:
        """The DataLoader's pinning thread calls this on CUDA: page-locked tensors copy asynchronously."""
        pinned = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in self.inputs.items()}
        return FedBatch(self.indices, self.errors, pinned)


class _Sources(Dataset):
    """Source ``i`` opened and prepared, or its ImageError."""

    def __init__(self, sources: Sequence[ImageSource], prepare: Prepare) -> None:
        self.sources, self.prepare = sources, prepare

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[int, Mapping[Hashable, Any] | ImageError]:
        opened = open_source(self.sources[i])
        return i, opened if isinstance(opened, ImageError) else self.prepare(opened, i)


def _collate(items: list[tuple[int, Mapping[Hashable, Any] | ImageError]]) -> FedBatch:
    fed = FedBatch([i for i, _ in items], {i: v for i, v in items if isinstance(v, ImageError)})
    prepared = [v for _, v in items if not isinstance(v, ImageError)]
    for key in prepared[0] if prepared else ():
        values = [p[key] for p in prepared]
        stackable = all(isinstance(v, torch.Tensor) and v.shape == values[0].shape for v in values)
        fed.inputs[key] = torch.stack(values) if stackable else values
    return fed


def feed(
    sources: Sequence[ImageSource], batch_size: int, prepare: Prepare = keep_picture, workers: int | None = None,
    pin_memory: bool = False,
) -> Iterator[FedBatch]:  # fmt: skip
    """The sources in consecutive batches of ``batch_size``, opened and prepared by ``workers`` processes.

    ``prepare`` must be picklable (a module-level function or a ``PerImage``) when ``workers`` > 0.
    """
    batches = -(-len(sources) // batch_size)
    workers = default_workers() if workers is None else workers
    workers = min(workers, batches) if batches > 1 else 0
    loader = DataLoader(
        _Sources(sources, prepare), batch_size=batch_size, num_workers=workers, collate_fn=_collate,
        pin_memory=pin_memory and torch.cuda.is_available(), prefetch_factor=2 if workers else None,
    )  # fmt: skip
    yield from loader


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
