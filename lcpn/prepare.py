"""The ``prepare`` stage: check every image, split once, write per-node manifests.

Output (``split_datasets/`` by default)::

    hierarchy.json       the tree, node -> folder map, and how the split was made
    summary.json         counts, excluded files with reasons, duplicate groups, small leaves
    images.csv           every kept image: path, sha256, leaf, split, phash
    test.csv             the global end-to-end test set: path, sha256, label_path, phash
    <node folder>/train.csv, val.csv   per parent node: path, sha256, label (child class name)
    attributes/<name>/train.csv, val.csv   per attribute (``--attributes``): path, sha256, label (value)

With attributes, ``images.csv`` and ``test.csv`` also have a column per attribute (the raw value,
empty when missing); see ``attributes`` for how missing and rare values are handled.

The split is written into a temporary folder beside ``--out`` that replaces the old split whole
once it is complete, so a killed or failed run leaves the old split or none, never a mix; the old
split's embedding cache moves over. ``phash`` is the perceptual hash of ``duplicates``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tabulate import tabulate
from tqdm.auto import tqdm

from . import __version__, fsio
from .attributes import AttributeSpec, make_specs
from .duplicates import NEAR_DUPLICATE_BITS, THUMBNAIL_MAX_DIFFERENCE, perceptual_hash, thumbnail
from .errors import LcpnError
from .hierarchy import Hierarchy, names_of
from .images import ImageError, open_rgb, read_file
from .sources import Excluded, LabelledImage, SourceError
from .split import TEST, TRAIN, VAL, Image, SplitResult, make_split

log = logging.getLogger(__name__)

MANIFEST_HEADER = ("path", "sha256", "label")
TEST_HEADER = ("path", "sha256", "label_path", "phash")
IMAGES_HEADER = ("path", "sha256", "leaf", "split", "phash")
# Kept from the old split when a new one replaces it: features mode's embedding cache, keyed by
# file content and backbone, so it stays valid whatever the new split is.
KEPT_FROM_OLD_SPLIT = ("embeddings",)


class SplitFolderError(LcpnError):
    """``--out`` cannot take a split without losing something; the message says why."""


@dataclass
class PrepareResult:
    split: SplitResult
    excluded: list[Excluded]
    summary: dict


def inspect(items: list[LabelledImage], workers: int | None = None) -> tuple[list[Image], list[Excluded]]:
    """Decode and hash every file in parallel threads (PIL and hashlib release the GIL)."""

    def one(item: LabelledImage) -> Image | Excluded:
        try:
            data = read_file(item.path)
            picture = open_rgb(data)
        except ImageError as exc:
            return Excluded(item.path, str(exc))
        sha256 = hashlib.sha256(data).hexdigest()
        return Image(item.path, item.leaf, sha256, perceptual_hash(picture), item.attributes, thumbnail(picture))

    workers = workers or min(8, (os.cpu_count() or 1) * 2)
    good: list[Image] = []
    bad: list[Excluded] = []
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(one, items)
        for r in tqdm(results, total=len(items), desc="checking images", unit="img", leave=False, disable=None):
            (good if isinstance(r, Image) else bad).append(r)
    return good, bad


def prepare(
    items: list[LabelledImage],
    excluded: list[Excluded],
    out: str | Path,
    source: str,
    val: float = 0.2,
    test: float = 0.1,
    seed: int = 0,
    min_images: int = 0,
    materialize: str | None = None,
    attributes: Sequence[str] = (),
) -> PrepareResult:
    """Check, split and write; ``excluded`` holds what the source scan already left out.

    ``attributes`` names the attribute values (in each item's ``attributes``) to record and make
    manifests for; values with fewer than ``min_images`` images are grouped (``attributes``).
    """
    out = Path(out)
    _check_replaceable(out, items)
    images, bad = inspect(items)
    excluded = sorted([*excluded, *bad], key=lambda e: e.path)
    if not images:
        raise SourceError("no readable images were found")
    result = make_split(images, val=val, test=test, seed=seed, min_images=min_images)
    tree = result.hierarchy
    if len(tree.leaves) < 2:
        only = tree.leaves[0] if tree.leaves else "none"
        raise SourceError(f"a classifier needs at least two classes, but the data has one ({only})")

    settings = {"source": source, "val": val, "test": test, "seed": seed, "min_images": min_images}
    names = list(attributes)
    if names:
        settings["attributes"] = names
    train = [im for im in result.images if result.split_of(im) == TRAIN]
    specs = make_specs(names, _value_counts(result.images, names), _value_counts(train, names), min_images)
    with fsio.disk_full_as_error(out), fsio.replaced_folder(out, keep=KEPT_FROM_OLD_SPLIT) as folder:
        summary = _write_split(folder, result, excluded, settings, materialize, specs)
    return PrepareResult(split=result, excluded=excluded, summary=summary)


def _check_replaceable(out: Path, items: list[LabelledImage]) -> None:
    """Refuse an ``--out`` whose replacement would delete files that are not a split's."""
    if out.exists() and not out.is_dir():
        raise SplitFolderError(f"'{out}' is a file, not a folder; give --out a new or empty folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "hierarchy.json").is_file():
        raise SplitFolderError(
            f"'{out}' holds other files and no split; give --out a new or empty folder (prepare replaces it whole)"
        )
    inside = out.resolve()
    if any(Path(item.path).is_relative_to(inside) for item in items):
        raise SplitFolderError(f"the images are inside '{out}', which prepare replaces; choose another --out folder")


def _write_split(
    out: Path,
    result: SplitResult,
    excluded: list[Excluded],
    settings: dict,
    materialize: str | None,
    attributes: list[AttributeSpec],
) -> dict:
    """Write every file of the split into ``out``; hierarchy.json, which marks a split as made, last."""
    tree = result.hierarchy
    names = [a.name for a in attributes]

    def values(im: Image) -> list[str]:
        return [im.attributes.get(name, "") for name in names]

    fsio.write_csv(
        out / "images.csv",
        [*IMAGES_HEADER, *names],
        ((im.path, im.sha256, im.leaf, result.split_of(im), im.phash, *values(im)) for im in result.images),
    )
    fsio.write_csv(
        out / "test.csv",
        [*TEST_HEADER, *names],
        ((im.path, im.sha256, im.leaf, im.phash, *values(im)) for im in result.images if result.split_of(im) == TEST),
    )
    node_counts = {}
    for node in tree.parents:
        folder = out / tree.folders[node]
        counts = {}
        for split in (TRAIN, VAL):
            view = result.node_view(node, split)
            rows = [(im.path, im.sha256, names_of(child)[-1]) for im, child in view]
            fsio.write_csv(folder / f"{split}.csv", MANIFEST_HEADER, rows)
            counts[split] = dict(sorted(Counter(r[2] for r in rows).items()))
            if materialize:
                _materialize(folder / split, rows, materialize)
        node_counts[node or "(root)"] = counts
    attribute_counts = {a.name: _write_attribute(out, result, a) for a in attributes}

    summary = _summary(result, excluded, node_counts, settings)
    if attributes:
        summary["attributes"] = attribute_counts
    fsio.write_json(out / "summary.json", summary)
    index = {**tree.to_dict(), "split": settings, "lcpn_version": __version__}
    if attributes:
        index["attributes"] = {a.name: a.to_dict() for a in attributes}
    fsio.write_json(out / "hierarchy.json", index)
    return summary


def _value_counts(images: list[Image], names: list[str]) -> dict[str, Counter]:
    return {name: Counter(im.attributes[name] for im in images if name in im.attributes) for name in names}


def _write_attribute(out: Path, result: SplitResult, spec: AttributeSpec) -> dict:
    """An attribute's train/val manifests (images with a value only); its counts for summary.json."""
    labelled = [(im, spec.label_of(im.attributes[spec.name])) for im in result.images if spec.name in im.attributes]
    learnt = [(im, label) for im, label in labelled if label is not None]
    for split in (TRAIN, VAL):
        rows = [(im.path, im.sha256, label) for im, label in learnt if result.split_of(im) == split]
        fsio.write_csv(out / spec.folder / f"{split}.csv", MANIFEST_HEADER, rows)
    raw = Counter(im.attributes[spec.name] for im, _ in labelled)
    unlearnt = Counter(im.attributes[spec.name] for im, label in labelled if label is None)
    return {
        "values": dict(sorted(Counter(label for _, label in learnt).items())),
        "missing": len(result.images) - len(labelled),
        "grouped_into_other": {v: raw[v] for v in spec.grouped},
        "without_train_images": dict(sorted(unlearnt.items())),
        **{split: sum(result.split_of(im) == split for im, _ in learnt) for split in (TRAIN, VAL, TEST)},
    }


def _materialize(target: Path, rows: list[tuple[str, str, str]], how: str) -> None:
    """Lay a manifest out as ``<target>/<class>/<file>`` (symlinks or copies)."""
    for i, (path, _, label) in enumerate(rows):
        dest = target / label / f"{i:06d}_{Path(path).name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        if how == "symlink":
            dest.symlink_to(path)
        else:
            shutil.copy2(path, dest)


def _summary(result: SplitResult, excluded: list[Excluded], node_counts: dict, settings: dict) -> dict:
    tree = result.hierarchy
    per_split = Counter(result.assignment.values())
    return {
        "settings": settings,
        "images": {
            "kept": len(result.images),
            "excluded": len(excluded),
            **{s: per_split.get(s, 0) for s in (TRAIN, VAL, TEST)},
        },
        "tree": {
            "depth": tree.max_depth,
            "leaves": len(tree.leaves),
            "parents": len(tree.parents),
            "trainable_nodes": len(tree.trainable),
            "constant_nodes": [n for n in tree.parents if len(tree.children[n]) == 1],
        },
        "nodes": node_counts,
        "excluded": [{"path": e.path, "reason": e.reason} for e in excluded],
        "too_small_to_split": result.too_small,
        "dropped_by_min_images": result.dropped,
        "duplicate_groups": result.duplicate_groups,
        "conflicting_duplicates": result.conflicting_duplicates,
        "near_duplicate_max_bits": NEAR_DUPLICATE_BITS,
        "near_duplicate_max_thumbnail_difference": THUMBNAIL_MAX_DIFFERENCE,
        "near_duplicate_groups": result.near_duplicate_groups,
        "conflicting_near_duplicates": result.conflicting_near_duplicates,
    }


def format_summary(summary: dict, tree: Hierarchy, out: Path, show: int = 10) -> str:
    """The human-readable account of a prepare run."""
    im, t = summary["images"], summary["tree"]
    lines = [
        f"Split written to {out}",
        f"  images: {im['kept']} kept ({im['train']} train, {im['val']} val, {im['test']} test), "
        f"{im['excluded']} excluded",
        f"  tree: depth {t['depth']}, {t['leaves']} leaves, {t['parents']} parent nodes "
        f"({t['trainable_nodes']} to train, {len(t['constant_nodes'])} with a single child)",
        "",
    ]
    rows = []
    for node in tree.parents:
        counts = summary["nodes"][node or "(root)"]
        rows.append([node or "(root)", len(tree.children[node]), *(sum(counts[s].values()) for s in (TRAIN, VAL))])
    rows.append(["test (end to end)", "", "", im["test"]])
    # Class names that look like numbers ("2024", "1e5") stay as written.
    table = tabulate(
        rows, ["node", "children", "train", "val"], "plain", disable_numparse=True, colalign=("left", *["right"] * 3)
    )
    lines.extend(f"  {line}" for line in table.splitlines())

    def listing(title: str, entries: list[str]) -> None:
        if not entries:
            return
        lines.extend(["", f"{title}: {len(entries)}"])
        lines.extend(f"  {e}" for e in entries[:show])
        if len(entries) > show:
            lines.append(f"  ... and {len(entries) - show} more (see summary.json)")

    listing("Excluded files", [f"{e['path']}: {e['reason']}" for e in summary["excluded"]])
    listing(
        "Leaves too small to split (all kept in train, none in val/test)",
        [f"{leaf}: {n} image(s)" for leaf, n in summary["too_small_to_split"].items()],
    )
    listing(
        "Leaves dropped by --min-images",
        [f"{leaf}: {n} image(s)" for leaf, n in summary["dropped_by_min_images"].items()],
    )
    listing(
        "Groups of byte-identical files (each kept on one side of the split)",
        [" = ".join(Path(p).name for p in g) for g in summary["duplicate_groups"]],
    )
    listing(
        "Warning: identical files with different labels",
        [" = ".join(g) for g in summary["conflicting_duplicates"]],
    )
    listing(
        f"Groups of near-identical pictures (perceptual hashes at most {summary['near_duplicate_max_bits']} of 64 "
        "bits apart and colour thumbnails within "
        f"{summary['near_duplicate_max_thumbnail_difference']} of 255; each kept on one side of the split)",
        [" ~ ".join(Path(p).name for p in g) for g in summary["near_duplicate_groups"]],
    )
    listing(
        "Warning: near-identical pictures with different labels",
        [" ~ ".join(g) for g in summary["conflicting_near_duplicates"]],
    )
    for name, a in summary.get("attributes", {}).items():
        values = ", ".join(f"{v} {n}" for v, n in sorted(a["values"].items(), key=lambda x: -x[1]))
        split = f"{a['train']} train, {a['val']} val, {a['test']} test"
        lines += ["", f"Attribute {name}: {len(a['values'])} values ({values})",
                  f"  {split}; {a['missing']} image(s) without a value"]  # fmt: skip
        if a["grouped_into_other"]:
            grouped = ", ".join(f"{v} {n}" for v, n in a["grouped_into_other"].items())
            lines.append(f"  values with fewer than --min-images images, grouped into 'other': {grouped}")
        if a["without_train_images"]:
            unlearnt = ", ".join(f"{v} {n}" for v, n in a["without_train_images"].items())
            lines.append(f"  values without a train image (not learnt; their images are left out): {unlearnt}")
    if summary["tree"]["constant_nodes"]:
        lines.extend(
            [
                "",
                "Nodes with a single child (constant, not trained): "
                + ", ".join(n or "(root)" for n in summary["tree"]["constant_nodes"]),
            ]
        )
    return "\n".join(lines)
