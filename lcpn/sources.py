"""Labelled image sources: a folder tree of any depth, or a CSV with one column per level.

Both yield ``LabelledImage`` records (absolute path + leaf node id) and a list of rows or files
that were left out, each with its reason. Nothing here opens an image; see ``images``.
``with_attributes`` adds attribute values (gender, colour, ...) from a CSV, joined on the image path.

Folder-tree rule: folders are classes and images belong to leaf folders only. A file that sits
directly in a class folder that also has sub-folders has no leaf class, so it is left out and
reported. Files at the top of the tree (a README, a config file) belong to no class and are ignored.
"""

from __future__ import annotations

import csv
import os
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from .attributes import check_names, clean_value
from .errors import LcpnError
from .hierarchy import SEP, node_id
from .images import IMAGE_SUFFIXES, is_hidden


class SourceError(LcpnError):
    """The source as a whole cannot be used (missing, empty, malformed); the message says why."""


@dataclass(frozen=True)
class LabelledImage:
    path: str  # absolute
    leaf: str  # node id of the leaf class
    attributes: Mapping[str, str] = field(default_factory=dict, hash=False)  # name -> value; missing: absent


@dataclass(frozen=True)
class Excluded:
    path: str
    reason: str


def scan_tree(root: str | Path) -> tuple[list[LabelledImage], list[Excluded]]:
    """Every file below ``root`` labelled by its folder path; hidden files are ignored.

    Links to folders are followed, but every folder is scanned once only (by device and inode): a
    link back up the tree or a second link to a class folder is reported instead, and so is a
    folder named like an image file (``x.jpg/``), which would otherwise turn its class's images into
    files beside a sub-folder.
    """
    root = Path(root)
    if not root.exists():
        raise SourceError(f"the folder '{root}' does not exist")
    if not root.is_dir():
        raise SourceError(f"'{root}' is not a folder")
    root = root.resolve()
    items: list[LabelledImage] = []
    excluded: list[Excluded] = []
    scanned: dict[tuple[int, int], Path] = {}

    def first_visit(folder: Path) -> bool:
        """Record ``folder``, or report it and say False when it was scanned before or is a link to a
        folder of the tree (scanned in its own place)."""
        info = folder.stat()
        target = folder.resolve()
        if folder.is_symlink() and target.is_relative_to(root):
            seen_as = target  # the folder itself is scanned where it is
        else:
            seen_as = scanned.setdefault((info.st_dev, info.st_ino), folder)
            if seen_as == folder:
                return True
        excluded.append(Excluded(str(folder), f"a link to '{seen_as}', a folder scanned only once"))
        return False

    def walk(folder: Path, names: tuple[str, ...]) -> None:
        subdirs, files = [], []
        for entry in sorted(p for p in folder.iterdir() if not is_hidden(p)):
            if entry.is_file():
                files.append(entry)
            elif not entry.is_dir():
                if names:
                    excluded.append(Excluded(str(entry), "neither a file nor a folder (a broken link?)"))
            elif entry.suffix.lower() in IMAGE_SUFFIXES:
                excluded.append(Excluded(str(entry), "a folder named like an image file (not scanned)"))
            elif first_visit(entry):
                subdirs.append(entry)
        if subdirs and names:  # files at the top (a README, a config) belong to no class
            for f in files:
                excluded.append(Excluded(str(f), "file in a folder that has sub-folders (not a leaf class)"))
        if subdirs:
            for d in subdirs:
                walk(d, names + (d.name,))
        elif names:
            items.extend(LabelledImage(str(f), node_id(names)) for f in files)

    first_visit(root)
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

    Relative image paths are resolved against ``image_root`` (default: the CSV's folder); a path
    that leads outside it (``../../etc/shadow``, an absolute path elsewhere) is never opened. Rows
    with an empty label, a label with a control character (a quoted line break would make a new
    class), or a missing file are left out, and a file listed again is kept once; each is reported
    with its line number. A ``/`` in a label would break node ids, so it is replaced by ``_``.
    """
    csv_path = _existing(csv_path)
    if not levels:
        raise SourceError("--levels needs at least one column name")
    root = _image_root(csv_path, image_root)
    items: list[LabelledImage] = []
    excluded: list[Excluded] = []
    kept: dict[str, tuple[int, str]] = {}  # path -> line and leaf of the row that is used
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        reader = _reader(fh, csv_path, [path_column, *levels])
        for row in reader:
            # The record's first line: a quoted line break makes a record span more than one.
            lineno = reader.line_num - sum(v.count("\n") for v in row.values() if isinstance(v, str))
            where = f"{csv_path.name} line {lineno}"
            rel = (row.get(path_column) or "").strip()
            if not rel:
                excluded.append(Excluded(where, f"empty '{path_column}'"))
                continue
            path = _inside(root, rel)
            if path is None:
                excluded.append(Excluded(rel, f"{where}: outside the image root '{root}' (not opened)"))
                continue
            labels = [(row.get(c) or "").strip() for c in levels]
            reason = _label_problem(levels, labels) or (None if path.is_file() else "file not found")
            leaf = node_id(v.replace(SEP, "_") for v in labels)
            if reason is None and str(path) in kept:
                first, first_leaf = kept[str(path)]
                reason = f"the same file as line {first}" + (
                    " (kept once)" if leaf == first_leaf else f", with other labels (line {first} is kept)"
                )
            if reason is not None:
                excluded.append(Excluded(str(path), f"{where}: {reason}"))
                continue
            kept[str(path)] = (lineno, leaf)
            items.append(LabelledImage(str(path), leaf))
    if not items:
        raise SourceError(f"no usable rows in '{csv_path}'")
    return items, excluded


def with_attributes(
    items: list[LabelledImage],
    csv_path: str | Path,
    names: list[str],
    path_column: str = "path",
    image_root: str | Path | None = None,
    required: bool = True,
) -> list[LabelledImage]:
    """``items`` with the values of the attribute columns ``names`` of a CSV, joined on the image path.

    Paths resolve as in ``scan_csv``. An empty value, one with a control character, or an image
    without a row is missing for that attribute and simply left out of its mapping; the first row
    of a path counts. With ``required=False`` the columns the CSV lacks are skipped instead of refused.
    """
    check_names(names)
    csv_path = _existing(csv_path)
    root = _image_root(csv_path, image_root)
    table: dict[str, dict[str, str]] = {}
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        reader = _reader(fh, csv_path, [path_column, *(names if required else [])])
        names = [n for n in names if n in (reader.fieldnames or [])]
        for row in reader:
            path = _inside(root, (row.get(path_column) or "").strip())
            if path is not None and str(path) not in table:
                values = {n: clean_value(row.get(n)) for n in names}
                table[str(path)] = {n: v for n, v in values.items() if v}
    return [replace(it, attributes={**it.attributes, **table.get(str(Path(it.path).resolve()), {})}) for it in items]


def _existing(csv_path: str | Path) -> Path:
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise SourceError(f"the CSV file '{csv_path}' does not exist")
    return csv_path


def _image_root(csv_path: Path, image_root: str | Path | None) -> Path:
    root = Path(image_root) if image_root is not None else csv_path.parent
    if not root.is_dir():
        raise SourceError(f"the image root '{root}' is not a folder")
    return root.resolve()


def _reader(fh, csv_path: Path, needed: list[str]) -> csv.DictReader:
    """A reader of ``fh`` that has every ``needed`` column, or a SourceError that lists the CSV's columns."""
    reader = csv.DictReader(fh)
    columns = reader.fieldnames or []
    missing = [c for c in needed if c not in columns]
    if missing:
        raise SourceError(
            f"the CSV '{csv_path.name}' has no column {', '.join(repr(c) for c in missing)} "
            f"(its columns are: {', '.join(columns) or 'none'})"
        )
    return reader


def _inside(root: Path, rel: str) -> Path | None:
    """``root / rel`` resolved, or None when it leads outside ``root`` (never opened) or is empty."""
    if not rel:
        return None
    path = (root / rel).resolve()
    if Path(os.path.normpath(root / rel)).is_relative_to(root) or path.is_relative_to(root):
        return path
    return None


def _label_problem(levels: list[str], labels: list[str]) -> str | None:
    empty = [c for c, v in zip(levels, labels) if not v]
    if empty:
        return f"empty label in {', '.join(empty)}"
    control = [c for c, v in zip(levels, labels) if any(unicodedata.category(ch) == "Cc" for ch in v)]
    if control:
        return f"a control character (such as a line break) in {', '.join(control)}"
    return None
