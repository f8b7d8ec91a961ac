"""The class tree.

Node ids are full paths joined by ``/`` (``Apparel/Topwear``); the root's id is the empty string.
Two classes with the same name under different parents are therefore different nodes. Only parent
nodes (nodes with children) get a folder, in both the split and the model directories; the folder
map is part of the saved tree so that readers never derive paths on their own.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = ""
SEP = "/"
ROOT_FOLDER = "parent"
# Characters that are unsafe in a folder name on some file system; replaced in folder names only.
_UNSAFE = re.compile(r'[\\:*?"<>|\x00-\x1f]')
# Names that the split and model directories use for their own files and folders, which no
# node folder may take (compared with the folder's last part).
_RESERVED = {
    "hierarchy.json", "summary.json", "test.csv", "images.csv", "config.json", "backbone", "embeddings",
    "evaluation", "attributes", "bin", "train", "val", "train.csv", "val.csv", "model.pth", "node.json",
    "checkpoint.pt",
}  # fmt: skip


def node_id(names: Iterable[str]) -> str:
    """The id of the node reached by following ``names`` from the root."""
    return SEP.join(names)


def names_of(node: str) -> tuple[str, ...]:
    """The class names along the path from the root to ``node`` (empty for the root)."""
    return tuple(node.split(SEP)) if node else ()


def parent_of(node: str) -> str:
    return node.rpartition(SEP)[0]


def depth_of(node: str) -> int:
    """Depth of a node: 0 for the root, 1 for a top-level class, and so on."""
    return len(names_of(node))


def ancestors(node: str) -> list[str]:
    """Every node on the path from the first level down to ``node`` itself (root excluded)."""
    names = names_of(node)
    return [node_id(names[: i + 1]) for i in range(len(names))]


def tree_distance(a: str, b: str) -> int:
    """Number of edges between two nodes of the tree."""
    na, nb = names_of(a), names_of(b)
    common = 0
    while common < min(len(na), len(nb)) and na[common] == nb[common]:
        common += 1
    return (len(na) - common) + (len(nb) - common)


@dataclass(frozen=True)
class Hierarchy:
    """A class tree: every node id maps to the ids of its children, in sorted order."""

    children: dict[str, tuple[str, ...]]
    folders: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_leaves(cls, leaves: Iterable[str]) -> Hierarchy:
        """Build the tree from leaf ids; every prefix of a leaf becomes a node."""
        kids: dict[str, set[str]] = {ROOT: set()}
        for leaf in leaves:
            for node in ancestors(leaf):
                kids.setdefault(node, set())
                kids.setdefault(parent_of(node), set()).add(node)
        children = {n: tuple(sorted(c)) for n, c in sorted(kids.items())}
        for node, c in children.items():
            assert all(parent_of(x) == node for x in c), node
        return cls(children=children, folders=_assign_folders(children))

    # --- structure -----------------------------------------------------------------------------
    @property
    def nodes(self) -> list[str]:
        return list(self.children)

    @property
    def leaves(self) -> list[str]:
        return [n for n, c in self.children.items() if not c]

    @property
    def parents(self) -> list[str]:
        """Nodes with children, top-down (breadth first), root first."""
        return sorted((n for n, c in self.children.items() if c), key=lambda n: (depth_of(n), n))

    @property
    def trainable(self) -> list[str]:
        """Parents with two or more children: the nodes that need a classifier."""
        return [n for n in self.parents if len(self.children[n]) > 1]

    @property
    def max_depth(self) -> int:
        return max(depth_of(leaf) for leaf in self.leaves)

    def is_leaf(self, node: str) -> bool:
        return not self.children[node]

    def child_towards(self, parent: str, descendant: str) -> str | None:
        """The child of ``parent`` on the path to ``descendant``, or None if it is not below."""
        names, pnames = names_of(descendant), names_of(parent)
        if len(names) <= len(pnames) or names[: len(pnames)] != pnames:
            return None
        return node_id(names[: len(pnames) + 1])

    def leaves_under(self, node: str) -> list[str]:
        prefix = node + SEP if node else ""
        return [leaf for leaf in self.leaves if leaf == node or leaf.startswith(prefix)]

    def describe(self) -> str:
        """An indented text drawing of the tree."""
        lines: list[str] = []

        def walk(node: str, indent: int) -> None:
            for child in self.children[node]:
                mark = "" if self.is_leaf(child) else "/"
                lines.append("  " * indent + names_of(child)[-1] + mark)
                walk(child, indent + 1)

        walk(ROOT, 0)
        return "\n".join(lines)

    # --- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "root_folder": self.folders[ROOT],
            "nodes": {
                n: {"children": list(c), **({"folder": self.folders[n]} if c else {})} for n, c in self.children.items()
            },
        }

    @classmethod
    def from_dict(cls, data: dict) -> Hierarchy:
        nodes = data["nodes"]
        children = {n: tuple(v["children"]) for n, v in nodes.items()}
        folders = {n: v["folder"] for n, v in nodes.items() if "folder" in v}
        if ROOT not in children:
            raise ValueError("the tree has no root node")
        return cls(children=children, folders=folders)

    @classmethod
    def load(cls, path: Path) -> Hierarchy:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def safe_folder_name(name: str) -> str:
    cleaned = _UNSAFE.sub("_", name).strip(" .")
    return cleaned or "_"


def _folder_key(folder: str) -> str:
    """What a folder name is on macOS and Windows, which ignore case and Unicode composition."""
    return unicodedata.normalize("NFC", folder).casefold()


def _assign_folders(children: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """Folder (relative path) for every parent node: nested like the tree, root in ``parent/``.

    A class that would collide with the root folder, a reserved file name or, after cleaning
    unsafe characters, a sibling's folder gets a numbered suffix. Names are compared as a
    case-insensitive file system sees them, so ``Bags`` and ``bags`` get ``Bags`` and ``bags_2``.
    """
    folders: dict[str, str] = {}
    parents = sorted((n for n, c in children.items() if c), key=lambda n: (depth_of(n), n))
    taken: set[str] = set()
    reserved = {_folder_key(name) for name in _RESERVED}
    for node in parents:
        if node == ROOT:
            base = ROOT_FOLDER
        else:
            up = folders.get(parent_of(node), "") if depth_of(node) > 1 else ""
            base = (up + SEP if up else "") + safe_folder_name(names_of(node)[-1])
        candidate, i = base, 1
        while (
            _folder_key(candidate) in taken
            or _folder_key(candidate.rpartition(SEP)[2]) in reserved
            or (node != ROOT and _folder_key(candidate) == ROOT_FOLDER)
        ):
            i += 1
            candidate = f"{base}_{i}"
        taken.add(_folder_key(candidate))
        folders[node] = candidate
    return folders
