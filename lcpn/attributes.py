"""Product attributes beside the category path (gender, colour, season, ...): one flat classifier each.

An attribute is a column of labels per image. ``prepare`` records every image's value in
``images.csv`` and ``test.csv`` and writes, per attribute, ``attributes/<folder>/train.csv`` and
``val.csv``: views of the category tree's one split (the split itself never looks at attributes).
So training treats an attribute like a parent node whose children are the attribute's values.

- An empty or missing value leaves the image out of that attribute only (counted in the summary).
- A value with fewer images than ``--min-images`` is grouped into ``OTHER`` (reported): the head
  then says "a rare value" instead of learning a class from a handful of pictures or guessing a
  common one. A real value named ``other`` joins that group.
- A value (after grouping) with no image in the train split cannot be learnt: it is not a class,
  its val images are left out of the attribute, and evaluation reports its images as a value the
  model does not know (the split follows the category tree, so this happens to the rarest values).

The split's and the models' ``hierarchy.json`` hold ``attributes``: ``{name: {"folder", "values",
"grouped"}}``; the models' lists the attributes trained into that folder.
"""

from __future__ import annotations

import json
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import LcpnError
from .hierarchy import safe_folder_name

ATTRIBUTES_FOLDER = "attributes"
OTHER = "other"
NODE_PREFIX = "attribute:"  # an attribute's node id in training and reports: "attribute:gender"
# Columns that images.csv and test.csv already have; an attribute column may not take their names.
RESERVED_COLUMNS = ("path", "sha256", "leaf", "split", "phash", "label", "label_path")


class AttributesError(LcpnError):
    """An attribute that cannot be used or is not known; the message says why."""


@dataclass(frozen=True)
class AttributeSpec:
    name: str
    folder: str  # relative to the split and to the model folder
    values: tuple[str, ...]  # the classes: values (after grouping) with train images, sorted
    grouped: tuple[str, ...] = ()  # rare values counted as OTHER

    @property
    def node(self) -> str:
        return NODE_PREFIX + self.name

    def label_of(self, value: str) -> str | None:
        """The class a raw value is trained and scored as; None for a value that is not a class."""
        label = OTHER if value in self.grouped else value
        return label if label in self.values else None

    def to_dict(self) -> dict:
        return {"folder": self.folder, "values": list(self.values), "grouped": list(self.grouped)}

    @classmethod
    def from_dict(cls, name: str, d: Mapping) -> AttributeSpec:
        return cls(name, d["folder"], tuple(d["values"]), tuple(d.get("grouped", ())))


def parse_names(text: str | None) -> list[str]:
    """``"gender, baseColour"`` -> ``["gender", "baseColour"]`` (duplicates once, order kept)."""
    names = [n.strip() for n in (text or "").split(",")]
    return list(dict.fromkeys(n for n in names if n))


def check_names(names: Iterable[str]) -> None:
    clash = [n for n in names if n in RESERVED_COLUMNS]
    if clash:
        raise AttributesError(
            f"the attribute name(s) {', '.join(map(repr, clash))} are taken by the manifests' own columns "
            f"({', '.join(RESERVED_COLUMNS)}); rename that column"
        )


def clean_value(value: str | None) -> str:
    """A value as recorded: stripped; empty when it is missing or holds a control character (a line break)."""
    value = (value or "").strip()
    return "" if any(unicodedata.category(ch) == "Cc" for ch in value) else value


def make_specs(
    names: list[str], counts: Mapping[str, Counter], train_counts: Mapping[str, Counter], min_images: int
) -> list[AttributeSpec]:
    """One spec per attribute from its value counts over all images and over the train split.

    Values with fewer than ``min_images`` images go into OTHER; classes without a train image are dropped.
    """
    specs, taken = [], set()
    for name in names:
        grouped = tuple(sorted(v for v, n in counts[name].items() if n < min_images))
        kept = {OTHER if v in grouped else v for v, n in train_counts[name].items() if n}
        folder, i = f"{ATTRIBUTES_FOLDER}/{safe_folder_name(name)}", 1
        while folder.casefold() in taken:  # names that differ only in case or unsafe characters
            i += 1
            folder = f"{ATTRIBUTES_FOLDER}/{safe_folder_name(name)}_{i}"
        taken.add(folder.casefold())
        specs.append(AttributeSpec(name, folder, tuple(sorted(kept)), grouped))
    return specs


def read_specs(folder: str | Path) -> dict[str, AttributeSpec]:
    """The attributes recorded in ``<folder>/hierarchy.json`` (a split or a model folder); none without one."""
    path = Path(folder) / "hierarchy.json"
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        return {name: AttributeSpec.from_dict(name, d) for name, d in (index.get("attributes") or {}).items()}
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise AttributesError(f"'{path}' records unusable attributes ({exc})") from None


def select(specs: Mapping[str, AttributeSpec], names: Iterable[str], where: str) -> list[AttributeSpec]:
    """The specs named, in the order given; an unknown name is an error that lists ``where``'s attributes."""
    names = list(names)
    unknown = [n for n in names if n not in specs]
    if unknown:
        known = ", ".join(specs) or "none (prepare with --attributes)"
        raise AttributesError(f"unknown attribute {', '.join(map(repr, unknown))}; {where} has: {known}")
    return [specs[n] for n in names]
