"""Labelled image sources: a folder tree of any depth, or a CSV with one column per level.

Both yield ``LabelledImage`` records (absolute path + leaf node id) and a list of rows or files
that were left out, each with its reason. Nothing here opens an image; see ``images``.

Folder-tree rule: folders are classes and images belong to leaf folders only. A file that sits
directly in a class folder that also has sub-folders has no leaf class, so it is left out and
reported. Files at the top of the tree (a README, a config file) belong to no class and are ignored.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from .errors import LcpnError
from .hierarchy import SEP, node_id
from .images import is_hidden


class SourceError(LcpnError):
    """The source as a whole cannot be used (missing, empty, malformed); the message says why."""


@dataclass(frozen=True)
class LabelledImage:
    path: str  # absolute
    leaf: str  # node id of the leaf class


@dataclass(frozen=True)
class Excluded:
    path: str
    reason: str


def scan_tree(root: str | Path) -> tuple[list[LabelledImage], list[Excluded]]:
    """Every file below ``root`` labelled by its folder path; hidden files are ignored."""
    root = Path(root)
    if not root.exists():
        raise SourceError(f"the folder '{root}' does not exist")
    if not root.is_dir():
        raise SourceError(f"'{root}' is not a folder")
    root = root.resolve()
    items: list[LabelledImage] = []
    excluded: list[Excluded] = []

    def walk(folder: Path, names: tuple[str, ...]) -> None:
        entries = sorted(p for p in folder.iterdir() if not is_hidden(p))
        subdirs = [p for p in entries if p.is_dir()]
        files = [p for p in entries if p.is_file()]
        if subdirs and names:  # files at the top (a README, a config) belong to no class
            for f in files:
                excluded.append(Excluded(str(f), "file in a folder that has sub-folders (not a leaf class)"))
        if subdirs:
            for d in subdirs:
                walk(d, names + (d.name,))
        elif names:
            items.extend(LabelledImage(str(f), node_id(names)) for f in files)

    walk(root, ())
    if not items:
        raise SourceError(f"no images found in class folders below '{root}'")
    return items, excluded


def scan_csv(
    csv_path: str | Path,
    levels: list[str],
    path_column: str = "path",
    image_root: str | Path | None = None,
) -> tuple[list[LabelledImage], list[Excluded]]:
    """Rows of a CSV labelled by the given level columns, top level first.

    Relative image paths are resolved against ``image_root`` (default: the CSV's folder). Rows with
    an empty label or a missing file are left out with the row number in the reason. A ``/`` in a
    label would break node ids, so it is replaced by ``_``.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise SourceError(f"the CSV file '{csv_path}' does not exist")
    if not levels:
        raise SourceError("--levels needs at least one column name")
    root = Path(image_root) if image_root is not None else csv_path.parent
    if not root.is_dir():
        raise SourceError(f"the image root '{root}' is not a folder")
    root = root.resolve()
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        missing = [c for c in [path_column, *levels] if c not in columns]
        if missing:
            raise SourceError(
                f"the CSV '{csv_path.name}' has no column {', '.join(repr(c) for c in missing)} "
                f"(its columns are: {', '.join(columns) or 'none'})"
            )
        rows = list(reader)
    items: list[LabelledImage] = []
    excluded: list[Excluded] = []
    for lineno, row in enumerate(rows, start=2):  # line 1 is the header
        rel = (row.get(path_column) or "").strip()
        where = f"{csv_path.name} line {lineno}"
        if not rel:
            excluded.append(Excluded(where, f"empty '{path_column}'"))
            continue
        path = (root / rel).resolve()
        empty = [c for c in levels if not (row.get(c) or "").strip()]
        if empty:
            excluded.append(Excluded(str(path), f"{where}: empty label in {', '.join(empty)}"))
            continue
        if not path.is_file():
            excluded.append(Excluded(str(path), f"{where}: file not found"))
            continue
        names = [(row[c] or "").strip().replace(SEP, "_") for c in levels]
        items.append(LabelledImage(str(path), node_id(names)))
    if not items:
        raise SourceError(f"no usable rows in '{csv_path}'")
    return items, excluded
