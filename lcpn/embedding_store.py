"""The embedding store: features-mode embeddings on disk, append-only, one shard per chunk.

A store is a folder named after the embedding it holds: the backbone, the image size and a digest
of its key (everything that changes the numbers, see ``features.embedding_key``), spelled out in
``key.json``. Each chunk of embeddings is a shard of two files: ``shard-<random>.npy``, a float32
matrix, and ``shard-<random>.json``, its index (the id of every row, the shape and a BLAKE2
checksum of the matrix). Both are written atomically, the index last, so a shard exists once its
index does.

Shards are never rewritten: adding a chunk writes that chunk alone, and parallel jobs (``JOBS>1``)
each add their own shards without losing each other's. An id found in two shards holds the same
embedding in both; the first one read wins. Opening a store reads the indexes and memory-maps
the matrices; a shard that fails a check (unreadable index, wrong shape, checksum) is deleted
with a warning and its rows count as missing, so they are computed again, never trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import fsio

log = logging.getLogger(__name__)

STALE_AFTER_S = 3600  # a killed writer's leftovers older than this are removed; younger ones may be in flight


class DamagedShard(Exception):
    """A shard that fails a check; the message says which."""


class EmbeddingStore:
    """``{id: embedding}`` for one embedding key, in append-only shards under ``root``."""

    def __init__(self, root: str | Path, key: Mapping[str, Any]) -> None:
        text = json.dumps(key, sort_keys=True)
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        self.key = json.loads(text)
        self.folder = Path(root) / f"{key['backbone']}-{key['image_size']}px-{digest}"
        self._rows: dict[str, np.ndarray] = {}  # id -> its row, a view into a shard's matrix
        if self.folder.is_dir():
            self._remove_leftovers()
            for index in sorted(self.folder.glob("shard-*.json")):
                self._open_shard(index)

    def __contains__(self, id_: str) -> bool:
        return id_ in self._rows

    def __getitem__(self, id_: str) -> np.ndarray:
        return self._rows[id_]

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def add(self, ids: Sequence[str], features: np.ndarray) -> None:
        """Write one shard holding ``features`` (a row per id) and make its rows available."""
        matrix = np.ascontiguousarray(features, dtype=np.float32)
        if matrix.ndim != 2 or len(matrix) != len(ids):
            raise ValueError(f"{len(ids)} ids for a matrix of shape {matrix.shape}")
        if not ids:
            return
        if not (self.folder / "key.json").is_file():
            fsio.write_json(self.folder / "key.json", self.key)
        name = f"shard-{uuid.uuid4().hex}"
        with fsio.atomic_path(self.folder / f"{name}.npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, matrix)
        index = {"ids": list(ids), "shape": list(matrix.shape), "blake2b": _checksum(matrix)}
        fsio.write_json(self.folder / f"{name}.json", index)  # last: the shard now exists
        self._take(ids, matrix)

    def _take(self, ids: Sequence[str], matrix: np.ndarray) -> None:
        for id_, row in zip(ids, matrix):
            self._rows.setdefault(id_, row)

    def _open_shard(self, index: Path) -> None:
        npy = index.with_suffix(".npy")
        try:
            ids, matrix = _read_shard(index, npy)
        except DamagedShard as exc:
            log.warning("removing the damaged embedding shard %s (%s); its images are embedded again", npy, exc)
            index.unlink(missing_ok=True)
            npy.unlink(missing_ok=True)
            return
        self._take(ids, matrix)

    def _remove_leftovers(self) -> None:
        """Temporary files and matrices without an index, left by a killed writer."""
        cutoff = time.time() - STALE_AFTER_S
        candidates = [*self.folder.glob(".*.tmp"), *self.folder.glob("shard-*.npy")]
        for path in candidates:
            if path.suffix == ".npy" and path.with_suffix(".json").exists():
                continue
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()


def _read_shard(index: Path, npy: Path) -> tuple[list[str], np.ndarray]:
    try:
        meta = json.loads(index.read_text(encoding="utf-8"))
        ids, shape, checksum = meta["ids"], tuple(meta["shape"]), meta["blake2b"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DamagedShard(f"unreadable index: {exc}") from None
    try:
        matrix = np.load(npy, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DamagedShard(f"unreadable matrix: {exc}") from None
    if matrix.dtype != np.float32 or matrix.shape != shape or len(ids) != shape[0]:
        raise DamagedShard(f"a {matrix.dtype} matrix of shape {matrix.shape} for {len(ids)} ids of shape {shape}")
    if _checksum(matrix) != checksum:
        raise DamagedShard("checksum mismatch")
    return ids, matrix


def _checksum(matrix: np.ndarray) -> str:
    return hashlib.blake2b(memoryview(matrix)).hexdigest()
