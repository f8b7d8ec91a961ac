"""One image-level train/val/test split, and per-node views of it.

The split is made once, stratified by leaf. Every parent node's train/val set is the part of that
one split below the node, relabelled with the node's child on the path. So an image used to train
any node is never in the end-to-end test set. Byte-identical files and near-identical pictures
(perceptual hashes within ``duplicates.NEAR_DUPLICATE_BITS`` and colour thumbnails that agree,
``duplicates.same_pictures``; taken transitively: a chain of near copies is one group) form one
group that lands on one side. Leaves too small to split stay in train and are reported.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components

from .duplicates import THUMBNAIL_SIZE, near_pairs, same_pictures
from .hierarchy import Hierarchy

TRAIN, VAL, TEST = "train", "val", "test"
# A leaf needs at least this many distinct images (duplicate groups) to give one to val and test.
MIN_TO_SPLIT = 3


@dataclass(frozen=True)
class Image:
    path: str
    leaf: str
    sha256: str
    phash: str | None = None  # 16 hex digits; None groups by content alone
    attributes: Mapping[str, str] = field(default_factory=dict, hash=False)  # carried along, never split on
    # (size, size, 3) uint8, duplicates.thumbnail; None: a near hash alone makes a near copy
    thumbnail: np.ndarray | None = field(default=None, compare=False, hash=False, repr=False)


@dataclass
class SplitResult:
    hierarchy: Hierarchy
    assignment: dict[str, str]  # path -> train/val/test
    images: list[Image]  # kept images, sorted by (leaf, path)
    too_small: dict[str, int] = field(default_factory=dict)  # leaf -> images, all kept in train
    dropped: dict[str, int] = field(default_factory=dict)  # leaf -> images (--min-images)
    duplicate_groups: list[list[str]] = field(default_factory=list)  # paths, each group on one side
    conflicting_duplicates: list[list[str]] = field(default_factory=list)  # same bytes, other leaves
    near_duplicate_groups: list[list[str]] = field(default_factory=list)  # paths of different bytes
    conflicting_near_duplicates: list[list[str]] = field(default_factory=list)  # near-identical, other leaves

    def split_of(self, image: Image) -> str:
        return self.assignment[image.path]

    def node_view(self, node: str, split: str) -> list[tuple[Image, str]]:
        """(image, child of ``node`` on its path) for every image of ``split`` below ``node``."""
        out = []
        for im in self.images:
            if self.assignment[im.path] == split:
                child = self.hierarchy.child_towards(node, im.leaf)
                if child is not None:
                    out.append((im, child))
        return out


def make_split(images: list[Image], val: float, test: float, seed: int = 0, min_images: int = 0) -> SplitResult:
    """Split ``images`` (path, leaf, content hash) into train/val/test; see the module docstring."""
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ValueError("val and test must be fractions in [0, 1) that sum to less than 1")
    images = sorted(images, key=lambda im: (im.leaf, im.path))
    per_leaf = Counter(im.leaf for im in images)
    dropped = {leaf: n for leaf, n in per_leaf.items() if n < min_images}
    images = [im for im in images if im.leaf not in dropped]

    # A group goes with the leaf most of its members carry.
    groups_by_leaf: dict[str, list[list[Image]]] = defaultdict(list)
    near_groups, conflicting_near = [], []
    for members in _groups(images):
        leaves = Counter(m.leaf for m in members)
        groups_by_leaf[min(leaves, key=lambda x: (-leaves[x], x))].append(members)
        if len({m.sha256 for m in members}) > 1:
            near_groups.append([m.path for m in members])
            if len(leaves) > 1:
                conflicting_near.append(_with_leaves(members))
    by_hash: dict[str, list[Image]] = defaultdict(list)
    for im in images:
        by_hash[im.sha256].append(im)
    identical = [members for members in by_hash.values() if len(members) > 1]

    assignment: dict[str, str] = {}
    too_small: dict[str, int] = {}
    for leaf in sorted(groups_by_leaf):
        groups = groups_by_leaf[leaf]
        n_images = sum(len(g) for g in groups)
        if len(groups) < MIN_TO_SPLIT:
            too_small[leaf] = sum(m.leaf == leaf for g in groups for m in g)
            for g in groups:
                assignment.update((m.path, TRAIN) for m in g)
            continue
        # String seeds are hashed with SHA-512 by `random`, so this is stable across runs.
        rng = random.Random(f"{seed}:{leaf}")
        rng.shuffle(groups)
        want = {TEST: _quota(test, n_images), VAL: _quota(val, n_images)}
        got = {TEST: 0, VAL: 0}
        for i, g in enumerate(groups):
            left = len(groups) - i
            side = TRAIN
            for s in (TEST, VAL):
                # Keep at least one group for train whatever the quotas say.
                if got[s] < want[s] and left > 1:
                    side = s
                    break
            got[side] = got.get(side, 0) + len(g)
            assignment.update((m.path, side) for m in g)

    kept_leaves = sorted({im.leaf for im in images})
    return SplitResult(
        hierarchy=Hierarchy.from_leaves(kept_leaves),
        assignment=assignment,
        images=images,
        too_small=too_small,
        dropped=dropped,
        duplicate_groups=sorted([m.path for m in members] for members in identical),
        conflicting_duplicates=sorted(_with_leaves(m) for m in identical if len({im.leaf for im in m}) > 1),
        near_duplicate_groups=sorted(near_groups),
        conflicting_near_duplicates=sorted(conflicting_near),
    )


def _groups(images: list[Image]) -> list[list[Image]]:
    """The images that must stay together: connected by identical bytes or as near copies.

    A graph of images and contents: each image links to its content, and near copies
    (``_near_copies``) link to each other; its connected components are the groups.
    """
    if not images:
        return []
    contents = {h: i for i, h in enumerate(sorted({im.sha256 for im in images}))}
    edges = [(i, len(images) + contents[im.sha256]) for i, im in enumerate(images)]
    edges += _near_copies(images)
    rows, cols = np.array(edges).T
    size = len(images) + len(contents)
    graph = coo_array((np.ones(len(edges)), (rows, cols)), shape=(size, size))
    _, component = connected_components(graph, directed=False)
    groups: dict[int, list[Image]] = defaultdict(list)
    for im, c in zip(images, component):
        groups[c].append(im)
    return list(groups.values())


def _near_copies(images: list[Image]) -> list[tuple[int, int]]:
    """Pairs of images of other bytes whose hashes are near and whose thumbnails agree (where both have one)."""
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, im in enumerate(images):
        if im.phash:
            by_hash[im.phash].append(i)
    hashes = sorted(by_hash)
    pairs = [pair for members in by_hash.values() for pair in itertools.combinations(members, 2)]
    pairs += [pair for a, b in near_pairs(hashes) for pair in itertools.product(by_hash[hashes[a]], by_hash[hashes[b]])]
    pairs = [(i, j) for i, j in pairs if images[i].sha256 != images[j].sha256]  # same bytes: linked already
    blank = np.zeros((THUMBNAIL_SIZE, THUMBNAIL_SIZE, 3), np.uint8)
    known = [im.thumbnail is not None for im in images]
    same = same_pictures(np.stack([blank if im.thumbnail is None else im.thumbnail for im in images]), pairs)
    return [(i, j) for (i, j), agree in zip(pairs, same) if agree or not (known[i] and known[j])]


def _with_leaves(members: list[Image]) -> list[str]:
    return [f"{m.path} ({m.leaf})" for m in members]


def _quota(fraction: float, n: int) -> int:
    """Images a split side should get: the rounded share, but at least one if the share is > 0."""
    return 0 if fraction <= 0 else max(1, int(fraction * n + 0.5))
