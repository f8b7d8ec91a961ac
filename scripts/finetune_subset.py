#!/usr/bin/env python3
"""One node of a prepared split as a small split of its own, to compare training recipes on a CPU.

    python scripts/finetune_subset.py --split DIR --node Footwear [--train-per-class 60]
                                      [--val-per-class 30] [--seed 0] --out OUT

Writes ``OUT/split/``: a one-level tree of the node's children whose root has the node's train
and val images, at most ``--train-per-class`` / ``--val-per-class`` per class (a seeded random
sample), with an ``images.csv`` of that sample so that ``lcpn evaluate`` checks its images against
them; and ``OUT/test.csv``: the split's test images below the node, labelled by the node's child.
Its paths are the split's absolute ones, so it is read with ``--image-root /``::

    lcpn evaluate --models MODELS --csv OUT/test.csv --levels label --image-root /

A model trained on ``OUT/split`` then scores the node's accuracy given the true parent; on an
out-of-distribution folder tree, evaluate ``<ood>/<node>`` the same way (docs/benchmarks.md has the
commands).
"""

from __future__ import annotations

import argparse
import random
from collections import defaultdict
from pathlib import Path

from lcpn import fsio
from lcpn.hierarchy import Hierarchy, names_of

COLUMNS = ("path", "sha256", "label")
IMAGES_COLUMNS = ("path", "sha256", "leaf", "split", "phash")  # what lcpn's overlap check reads


def sample_per_class(rows: list[dict], limit: int, rng: random.Random) -> list[dict]:
    """At most ``limit`` rows of each label, in the manifest's order."""
    by_label = defaultdict(list)
    for i, row in enumerate(rows):
        by_label[row["label"]].append(i)
    kept = {i for indices in by_label.values() for i in rng.sample(indices, min(limit, len(indices)))}
    return [row for i, row in enumerate(rows) if i in kept]


def write_subset(split: Path, node: str, out: Path, train_per_class: int, val_per_class: int, seed: int) -> dict:
    tree = Hierarchy.load(split / "hierarchy.json")
    if node not in tree.trainable:
        raise SystemExit(f"'{node}' is not a trainable node of {split}; the nodes are: {', '.join(tree.trainable)}")
    children = [names_of(c)[-1] for c in tree.children[node]]
    sub = Hierarchy.from_leaves(children)
    fsio.write_json(out / "split" / "hierarchy.json", sub.to_dict())
    phash = {r["path"]: r.get("phash", "") for r in fsio.read_csv(split / "images.csv")}
    rng, counts, seen = random.Random(seed), {}, []
    for name, limit in (("train", train_per_class), ("val", val_per_class)):
        rows = sample_per_class(fsio.read_csv(split / tree.folders[node] / f"{name}.csv"), limit, rng)
        manifest = out / "split" / sub.folders[""] / f"{name}.csv"
        fsio.write_csv(manifest, COLUMNS, [[r[c] for c in COLUMNS] for r in rows])
        seen += [[r["path"], r["sha256"], r["label"], name, phash.get(r["path"], "")] for r in rows]
        counts[name] = len(rows)
    fsio.write_csv(out / "split" / "images.csv", IMAGES_COLUMNS, seen)
    prefix = node + "/"
    test = [(r["path"], r["label_path"][len(prefix) :].split("/")[0])
            for r in fsio.read_csv(split / "test.csv") if r["label_path"].startswith(prefix)]  # fmt: skip
    fsio.write_csv(out / "test.csv", ("path", "label"), test)
    counts["test"] = len(test)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", type=Path, required=True, help="a split folder from `lcpn prepare`")
    parser.add_argument("--node", required=True, help="the parent node to cut out, e.g. Footwear")
    parser.add_argument("--train-per-class", type=int, default=60, help="most train images per class")
    parser.add_argument("--val-per-class", type=int, default=30, help="most val images per class")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample")
    parser.add_argument("--out", type=Path, required=True, help="where split/ and test.csv go")
    args = parser.parse_args()
    counts = write_subset(args.split, args.node, args.out, args.train_per_class, args.val_per_class, args.seed)
    print(f"{args.out}: " + ", ".join(f"{n} {k} images" for k, n in counts.items()))


if __name__ == "__main__":
    main()
