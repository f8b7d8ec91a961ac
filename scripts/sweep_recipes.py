#!/usr/bin/env python3
"""Features-mode recipes compared on the test split and an out-of-distribution set, one change at a time.

    python scripts/sweep_recipes.py --split bench_work/split_folders --cache bench_work/embeddings \\
        --recipe "default" --recipe "linear head=linear" --recipe "lite2 backbone=efficientnet-lite2" \\
        --out sweep.jsonl

A recipe is a name and ``KEY=VALUE`` training options (those of ``lcpn train``, checked the same way),
plus those that only this script reads (a recipe without options is ``lcpn train --mode features``'s default):

- ``backbone=A+B`` concatenates two backbones' embeddings (each embedded once, in its own store);
- ``adapt_priors=true`` re-estimates each node's class mix on the evaluated set (``lcpn.label_shift``);
- ``balance=TAU`` (0 to 1) divides each node's probabilities by its training class frequencies to
  the power TAU (logit adjustment, Menon et al. 2021; 1 treats every class as equally likely);
- ``crop_scale=LO`` and ``crop_ratio=R`` widen the random crops that make training views 3 and up
  (``views=3`` or more): from LO of the eval square's area instead of 80%, and aspect ratios from R to
  1/R instead of 0.9 to 1/0.9 (lcpn's own ``transforms.TRAIN_CROP_SCALE`` / ``TRAIN_CROP_RATIO``,
  changed for this recipe's embedding pass; the store keeps those views apart by their transform);
- ``proto=W`` (0 to 1) mixes each node's probabilities with those of a nearest-class-mean classifier
  (cosine to each class's mean standardised embedding) at weight W; ``proto_val=true`` chooses W per
  node by val log-loss (the tree's nodes only, not the attributes).

``colour_features=true`` puts ``lcpn.colour``'s histogram first, as ``lcpn train`` does (its own store
beside the backbone's, so the backbone does not run again). ``square=letterbox`` or ``square=crop``
embeds again only the pictures that are not square: a square picture is the same square in every mode.

Every image (train, val, test and the OOD set) is embedded once per backbone into the same embedding
store that ``lcpn train --cache`` uses, with lcpn's own views (train images get ``views`` views; test
and OOD images their mirror image too, for test flips). Each node's head is fitted with lcpn's own
``features.fit_head``, and the path is decoded with the cascade's best-path decoder, so a row here is
what ``lcpn train`` + ``lcpn evaluate`` would give with those options, without writing model folders
or embedding the evaluation images again for every recipe. Embedding is always done with two stage
features (the default) and sliced, since the smaller embeddings are its last dimensions; it runs in
the recipe's precision (``precision=bf16`` reads and fills the store of ``lcpn train --precision bf16``).

One JSON line per recipe goes to ``--out`` (appended): path accuracy, correct images and the most
frequent OOD mistakes; a table of every recipe run is printed at the end. With ``--attributes`` each
recipe also fits a head per attribute the split records and scores it as ``lcpn evaluate`` does (on
the images whose value is one of the attribute's classes; the OOD set's values from its labels.csv).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import Counter
from pathlib import Path
from unittest import mock

import click
import torch
from benchmark import DEFAULT_OOD, ood_items  # scripts/ is on the path when a script runs
from PIL import Image

from lcpn import fsio, transforms
from lcpn.artefacts import NodeInfo
from lcpn.attributes import read_specs
from lcpn.cascade import best_first
from lcpn.config import OPTIONS, TrainConfig
from lcpn.embedding_store import EmbeddingStore
from lcpn.evaluate import split_test_items
from lcpn.features import HeadData, embed_images, fit_head, head_spec, open_backbone
from lcpn.hierarchy import Hierarchy
from lcpn.label_shift import adapt_tree
from lcpn.nodes import NodeData, load_attribute_data, load_node_data
from lcpn.report import format_table
from lcpn.sources import with_attributes

EMBED_STAGES = 2  # embed once with the default stage features; fewer are the embedding's last dimensions
SCRIPT_KEYS = {
    "adapt_priors": click.BOOL,
    "balance": click.FloatRange(0, 1),
    "crop_scale": click.FloatRange(0, 1, min_open=True),
    "crop_ratio": click.FloatRange(0, 1, min_open=True),
    "proto": click.FloatRange(0, 1),
    "proto_val": click.BOOL,
}
PROTO_SCALES = (5.0, 10.0, 20.0, 40.0)  # cosine-logit scales of the prototypes, chosen by their val log-loss
PROTO_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)  # proto_val=true: the mixing weight chosen per node on val


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_recipe(text: str) -> tuple[str, dict, dict]:
    """``"name KEY=VALUE ..."`` -> (name, training options, this script's options)."""
    name, *pairs = text.split()
    options, extras = {}, {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.replace("-", "_")
        if not sep:
            raise ValueError(f"recipe '{name}': '{pair}' is not KEY=VALUE")
        if key in SCRIPT_KEYS:
            extras[key] = SCRIPT_KEYS[key].convert(value, None, None)
        elif key == "backbone":
            options[key] = value
        elif key in OPTIONS:
            options[key] = OPTIONS[key].type.convert(value, None, None)
        else:
            raise ValueError(f"recipe '{name}': unknown option '{key}'")
    return name, options, extras


def evaluation_items(split: Path, ood: Path | None, levels: str | None, tree: Hierarchy) -> dict[str, list]:
    """{"test": [LabelledImage], "ood": [LabelledImage]}: the split's test images (with their attribute
    values) and the OOD set's images of known leaves (with its labels.csv's values, where it has them)."""
    sets = {"test": split_test_items(split)}
    if ood:
        sets["ood"] = ood_items(ood, levels, tree)
        names = list(read_specs(split))
        if names and (ood / "labels.csv").is_file():
            sets["ood"] = with_attributes(sets["ood"], ood / "labels.csv", names, "path", ood, required=False)
    return sets


def embeddings(split: Path, cache: Path, backbone: str, config: TrainConfig, evaluated: list[str]) -> tuple:
    """{path: (views, dim)} for every split image and ``evaluated`` path (those with their mirror image),
    and the widths of the embedding's colour histogram and stage features."""
    config = dataclasses.replace(config, backbone=backbone, stage_features=EMBED_STAGES)
    rows = fsio.read_csv(split / "images.csv")
    views = {r["path"]: config.views if r["split"] == "train" else 1 for r in rows}
    views |= {p: max(2, views.get(p, 1)) for p in evaluated}
    if config.square == "squash":
        return embed(views, cache, config)
    # A square picture is the same square under every mode (the 9k set is all squares): only the
    # others are embedded again; the squares come from the squash store, which is what lcpn would compute.
    squares = {p: n for p, n in views.items() if is_square(p)}
    feats, dims = embed(squares, cache, dataclasses.replace(config, square="squash"))
    others, _ = embed({p: n for p, n in views.items() if p not in squares}, cache, config)
    return feats | others, dims


def embed(views: dict[str, int], cache: Path, config: TrainConfig) -> tuple:
    """``embeddings`` for the given {path: views}, from and into ``config``'s store."""
    shared, key = open_backbone(config)
    log(f"embeddings: {config.backbone}, {config.square}, {len(views)} images")
    embedder = shared.embedder
    widths = [embedder.network._blocks[i]._project_conv.out_channels for i in embedder.taps]
    colour = embedder.colour.dim if embedder.colour is not None else 0
    return embed_images(sorted(views), shared, EmbeddingStore(cache, key), views), (colour, widths)


def is_square(path: str) -> bool:
    try:
        with Image.open(path) as image:
            return image.width == image.height
    except OSError:
        return False  # unreadable: embed_images reports it


def select(feats: dict, dims: tuple[int, list[int]], stages: int) -> dict:
    """Keep the colour histogram (if any), the pooled outputs of the last ``stages`` stages and the final features."""
    colour, stage_dims = dims
    drop = sum(stage_dims[: len(stage_dims) - stages])
    return {p: torch.cat([f[:, :colour], f[:, colour + drop :]], 1) for p, f in feats.items()}


def run_recipe(name: str, options: dict, extras: dict, args, tree: Hierarchy, sets: dict, store: dict) -> dict:
    config = TrainConfig(**{"mode": "features", "device": "cpu", **options}).resolved()
    evaluated = [it.path for items in sets.values() for it in items]
    if ("crop_scale" in extras or "crop_ratio" in extras) and config.views < 3:
        raise SystemExit(f"recipe '{name}': crop_scale and crop_ratio shape training views 3 and up: add views=3")
    parts, crops = [], crop_settings(extras)
    for backbone in config.backbone.split("+"):
        ident = pass_key(config, backbone, crops)
        if ident not in store:
            with mock.patch.multiple(transforms, TRAIN_CROP_SCALE=crops[0], TRAIN_CROP_RATIO=crops[1]):
                store[ident] = embeddings(args.split, args.cache, backbone, config, evaluated)
        feats, widths = store[ident]
        parts.append(select(feats, widths, config.stage_features))
    feats = {p: torch.cat([part[p] for part in parts], 1) for p in parts[0]}
    dim = next(iter(feats.values())).shape[1]

    started = time.perf_counter()
    heads, priors, divisors = {}, {}, {}
    for node in tree.parents:
        data = load_node_data(args.split, tree, node)
        if len(data.classes) == 1:
            continue
        heads[node], prior = fit(data, feats, config, dim)
        if extras.get("proto") or extras.get("proto_val"):
            heads[node] = blend(data, feats, heads[node], extras.get("proto") or None)
        if extras.get("adapt_priors"):
            priors[node] = prior  # the one lcpn records in node.json
        if extras.get("balance"):
            counts = torch.tensor(data.counts()["train"], dtype=torch.float64) + 1  # a class of 0 images stays finite
            divisors[node] = (counts / counts.sum()) ** extras["balance"]
    fit_seconds = time.perf_counter() - started

    row = {"recipe": name, "options": options, **extras, "dim": dim, "fit_seconds": round(fit_seconds, 1)}
    for set_name, items in sets.items():
        predicted = decode(tree, heads, priors, divisors, feats, [it.path for it in items], config.test_flips)
        truth = [it.leaf for it in items]
        correct = sum(t == p for t, p in zip(truth, predicted))
        row[set_name] = {"path": round(correct / len(items), 4), "correct": correct, "images": len(items)}
        if set_name == "ood":
            mistakes = Counter((t, p) for t, p in zip(truth, predicted) if t != p).most_common(8)
            row["ood_mistakes"] = [f"{t} -> {p}: {n}" for (t, p), n in mistakes]
    if args.attributes:
        row["attributes"] = score_attributes(args.split, feats, config, dim, sets)
    return row


def pass_key(config: TrainConfig, backbone: str, crops: tuple) -> tuple:
    """What one recipe's embedding pass computes with: recipes of the same key share its embeddings.

    Everything that changes the pixels or the network is in it; stage features are not (the pass embeds
    with two and each recipe slices its own), nor is anything of the heads."""
    return (backbone, config.weights, config.image_size, config.square, config.views, config.colour_features,
            config.precision, crops)  # fmt: skip


def crop_settings(extras: dict) -> tuple[tuple[float, float], tuple[float, float]]:
    """The (scale, ratio) ranges of the training crops: lcpn's own unless the recipe widens them."""
    scale = (extras["crop_scale"], 1.0) if "crop_scale" in extras else transforms.TRAIN_CROP_SCALE
    ratio = (extras["crop_ratio"], 1 / extras["crop_ratio"]) if "crop_ratio" in extras else transforms.TRAIN_CROP_RATIO
    return scale, ratio


def fit(data: NodeData, feats: dict, config: TrainConfig, dim: int) -> tuple[torch.nn.Module, list[float]]:
    """A node's head as ``lcpn train`` fits it, and its class prior (``metrics.prior``)."""
    stub = NodeInfo(node=data.node, classes=data.classes, mode="features", head=head_spec(config, dim))
    head, outcome, _ = fit_head(data, feats, stub, config)
    return head, outcome.prior


class Prototypes(torch.nn.Module):
    """Nearest class mean by cosine on standardised embeddings (SimpleShot, Wang et al. 2019): a class
    of three images is judged by its images alone, with no prior learned from the class counts."""

    def __init__(self, standardize: torch.nn.Module, centroids: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.standardize, self.centroids, self.scale = standardize, centroids, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.nn.functional.normalize(self.standardize(x), dim=1) @ self.centroids.T


class Blend(torch.nn.Module):
    """Log of ``(1 - w) * p_head + w * p_prototypes`` (``probabilities`` takes its softmax)."""

    def __init__(self, head: torch.nn.Module, prototypes: Prototypes, weight: float) -> None:
        super().__init__()
        self.head, self.prototypes, self.weight = head, prototypes, weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = (1 - self.weight) * self.head(x).softmax(1) + self.weight * self.prototypes(x).softmax(1)
        return p.clamp(min=1e-12).log()


def prototypes(hd: HeadData, n_classes: int, standardize: torch.nn.Module) -> Prototypes:
    """A node's class centroids (every view of its train images) and the scale with the lowest val log-loss."""
    with torch.no_grad():
        unit = torch.nn.functional.normalize(standardize(hd.x_train), dim=1)
        centroids = torch.stack([unit[hd.y_train == c].mean(0) for c in range(n_classes)])
        centroids = torch.nn.functional.normalize(centroids, dim=1)
        losses = {s: torch.nn.functional.cross_entropy(Prototypes(standardize, centroids, s)(hd.x_val), hd.y_val).item()
                  for s in PROTO_SCALES}  # fmt: skip
    return Prototypes(standardize, centroids, min(losses, key=losses.get))


def blend(data: NodeData, feats: dict, head: torch.nn.Module, weight: float | None) -> Blend:
    """``Blend`` of a node's head with its prototypes at ``weight``, or (None) at the weight whose
    mixture has the lowest val log-loss."""
    hd = HeadData.gather(data, feats)  # the train and val embeddings fit_head read
    protos = prototypes(hd, len(data.classes), head[0])
    if weight is None:
        with torch.no_grad():
            losses = {w: torch.nn.functional.nll_loss(Blend(head, protos, w)(hd.x_val), hd.y_val).item()
                      for w in PROTO_WEIGHTS}  # fmt: skip
        weight = min(losses, key=losses.get)
    return Blend(head, protos, weight)


def score_attributes(split: Path, feats: dict, config: TrainConfig, dim: int, sets: dict) -> dict:
    """{attribute: {set: accuracy}}: a head per attribute, scored on the images whose value is one of its classes."""
    scores = {}
    for name, spec in read_specs(split).items():
        head, _ = fit(load_attribute_data(split, spec), feats, config, dim)
        scores[name] = {}
        for set_name, items in sets.items():
            scored = [(it, spec.label_of(it.attributes[name])) for it in items if name in it.attributes]
            scored = [(it, label) for it, label in scored if label is not None]
            probs = probabilities(head, feats, [it.path for it, _ in scored], config.test_flips)
            predicted = [spec.values[i] for i in probs.argmax(1).tolist()]
            correct = sum(label == p for (_, label), p in zip(scored, predicted))
            scores[name][set_name] = round(correct / max(1, len(scored)), 4)
    return scores


def probabilities(head: torch.nn.Module, feats: dict, paths: list[str], flips: bool):
    """A head's class probabilities per path, averaged over the mirror image with ``flips``."""
    views = [0, 1] if flips else [0]
    with torch.no_grad():
        p = sum(head(torch.stack([feats[q][v] for q in paths]).float()).softmax(1) for v in views)
    return p / len(views)


def decode(
    tree: Hierarchy, heads: dict, priors: dict, divisors: dict, feats: dict, paths: list[str], flips: bool
) -> list:
    """The best path per image, from each node's probabilities (averaged over the mirror image with
    ``flips``; adapted to the set's class mix when ``priors`` has each node's training prior;
    divided by ``divisors`` per node and renormalised where it has them)."""
    probs = {node: probabilities(head, feats, paths, flips).numpy() for node, head in heads.items()}
    if priors:
        probs, _ = adapt_tree(tree, probs, priors)
    for node, divisor in divisors.items():
        balanced = probs[node] / divisor.numpy()
        probs[node] = balanced / balanced.sum(1, keepdims=True)
    probs = {node: p.tolist() for node, p in probs.items()}

    def lookup(requests):
        return {(r, node): probs[node][r] if node in probs else [1.0] for r, node in requests}

    best = best_first(tree, range(len(paths)), lookup, 1)
    return [best[r][0][1][-1][0] for r in range(len(paths))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", type=Path, required=True, help="a split made by lcpn prepare")
    parser.add_argument("--cache", type=Path, required=True, help="the embedding store folder (shared across runs)")
    parser.add_argument("--ood", type=Path, default=DEFAULT_OOD, help="an out-of-distribution labelled folder tree")
    parser.add_argument("--no-ood", action="store_true", help="evaluate on the test split only")
    parser.add_argument("--levels", help="the split's label columns when it came from a CSV (for the OOD labels.csv)")
    parser.add_argument("--recipe", action="append", required=True, metavar='"NAME KEY=VALUE ..."',
                        help="a recipe to measure (repeat); options as lcpn train's, plus backbone=A+B, "
                             "adapt_priors=true and balance=TAU")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("sweep.jsonl"), help="JSON lines, one per recipe (appended)")
    parser.add_argument("--attributes", action="store_true",
                        help="also fit and score a head per attribute the split records")  # fmt: skip
    args = parser.parse_args()
    try:
        recipes = [parse_recipe(r) for r in args.recipe]
    except (ValueError, click.BadParameter) as exc:
        parser.error(str(exc))
    if not (args.split / "hierarchy.json").is_file():
        parser.error(f"'{args.split}' is not a prepared split (no hierarchy.json); run `lcpn prepare` first")
    if not args.no_ood and not args.ood.is_dir():
        parser.error(f"the OOD folder '{args.ood}' does not exist (give --ood DIR or --no-ood)")
    tree = Hierarchy.load(args.split / "hierarchy.json")
    sets = evaluation_items(args.split, None if args.no_ood else args.ood, args.levels, tree)
    store, rows = {}, []
    for name, options, extras in recipes:
        log(f"recipe {name}: {options} {extras}")
        row = run_recipe(name, options, extras, args, tree, sets, store)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        log(json.dumps(row))
        rows.append(row)
    names = list(sets)
    table = [[r["recipe"], *(f"{r[s]['path']:.4f} ({r[s]['correct']})" for s in names), r["fit_seconds"]] for r in rows]
    print(format_table(table, ["recipe", *(f"{s} path ({len(sets[s])})" for s in names), "fit s"]))
    if args.attributes:
        table = [[r["recipe"], a, *(acc.get(s) for s in names)] for r in rows for a, acc in r["attributes"].items()]
        print(format_table(table, ["recipe", "attribute", *(f"{s} accuracy" for s in names)]))


if __name__ == "__main__":
    main()
