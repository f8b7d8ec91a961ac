#!/usr/bin/env python3
"""Accuracy and speed of lcpn against its baselines, on the same images and machine.

    python scripts/benchmark.py [--data DIR] [--csv FILE --levels A,B,C] [--ood DIR | --no-ood]
                                [--no-attributes] [--option KEY=VALUE]... [--attribute-option NAME:KEY=VALUE]...
                                [--workdir DIR] [--out bench.json]

By default it runs on ../shared/data/fashion-products-9k with its two folder levels; pass
``--csv .../labels.csv --levels masterCategory,subCategory,articleType`` for three levels. In one
run it prepares the split, trains lcpn in features mode (its default backbone), evaluates on the
held-out test split AND on an out-of-distribution set (``--ood``, by default
../shared/data/fashion-products-ood-dev: other products of the same catalogue, another resize;
never trained on), and measures on the same test images:

accuracy   (``accuracy`` on the test split, ``accuracy_ood`` with the same keys on the OOD set)
           lcpn's cascade (best-path decoding, the default; greedy routing as an extra row); a
           flat classifier (one head over all leaves) on the same embeddings; hiclass's
           LocalClassifierPerParentNode with LogisticRegression on the same embeddings
throughput lcpn's batched Cascade in features mode (default decoding) and in finetune mode
           (greedy, like the classic loop); the classic per-image cascade that loads each model
           and its pickles from disk for every image; one backbone forward pass per batch (a flat
           classifier: the limit). The finetune-mode figures use
           EfficientNet-B4 at 380 px (the trainer's default, as in the classic tool) and, as extra
           keys, EfficientNet-Lite0 at 224 px (the smallest offline-pretrained backbone)
train time embedding every image (train images twice: plain and mirrored), every node's head in features
           mode on that cache, and one finetune-mode epoch
           over all nodes: B4 estimated from one timed training step of 16 images times the steps
           of an epoch; Lite0 from a timed epoch on a 64-image slice of every node
precision  the share of test images whose predicted path is the same under bf16 autocast and fp32,
           and the path accuracy under each
attributes with labels.csv (``--csv``, or the data folder's): heads for gender, baseColour, season
           and usage on the same split and embeddings; accuracy and macro F1 per attribute on the
           test split and the OOD set (``attributes``), the training time they add and the
           prediction throughput with and without them, taking turns on the first 256 test images
           (``attributes_speed``); ``--attributes-speed-only MODELS`` measures just that throughput;
           ``--attribute-option gender:class_weights=false`` trains one attribute with an option of
           its own (as ``lcpn train --attribute gender --no-class-weights`` would retrain it)
export     the features models exported to ONNX (float32, and int8 by static quantisation): the share
           of test images whose path equals torch's, path accuracy, throughput against torch's default
           precision (EXPORT_THROUGHPUT of the test images, same batch size) and file sizes;
           ``--export-only MODELS`` measures just that, on a model folder that exists (its split's test images)

The finetune-mode models serve the speed measurements only: B4 starts from random weights (no
ImageNet weights offline) and takes one step on 2 images per node; Lite0 takes one epoch on the
64-image slice. --workdir keeps the split, the embedding cache and the model folders for
`lcpn predict` / `lcpn evaluate`.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch

from lcpn import artefacts, backbones, fsio
from lcpn.cascade import DEFAULT_DECODE, Cascade, open_cascade
from lcpn.config import OPTIONS, TrainConfig
from lcpn.embedding_store import EmbeddingStore
from lcpn.evaluate import WORST_LEAVES, EvaluationResult, evaluate, split_test_items, worst_leaves
from lcpn.features import embed_images, fit_head, head_spec, open_backbone
from lcpn.hierarchy import Hierarchy, names_of
from lcpn.metrics import hierarchical_prf, level_scores, path_accuracy
from lcpn.models import HeadNode
from lcpn.nodes import NodeData
from lcpn.prepare import prepare
from lcpn.report import format_table
from lcpn.sources import SourceError, scan_csv, scan_tree, with_attributes
from lcpn.train import train_nodes

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "fashion-products-9k"
DEFAULT_OOD = REPO.parent / "shared" / "data" / "fashion-products-ood-dev"
FINETUNE_LITE = "efficientnet-lite0"  # the finetune-mode speed rows besides B4
BATCH = 32
SLICE = 64  # images per node for the finetune-mode models and the epoch estimate
CLASSIC_IMAGES = 24  # the per-image baseline is slow: time it on this many images
CLASSIC_IMAGES_B4 = 6
EXPORT_THROUGHPUT = 200  # test images timed per runtime: Lite2 runs ~8 images/s under torch on 2 cores
ATTRIBUTES = ["gender", "baseColour", "season", "usage"]
SPEED_IMAGES = 256  # test images timed with and without the attribute heads


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def accuracy_row(y_true: list[str], y_pred: list[str]) -> dict:
    row = {f"level_{lv['depth']}": lv["accuracy"] for lv in level_scores(y_true, y_pred)}
    row["path"] = path_accuracy(y_true, y_pred)
    row["hf"] = hierarchical_prf(y_true, y_pred)["f1"]
    return row


def throughput(cascade: Cascade, paths: list[str], repeat: int = 1, decode: str = DEFAULT_DECODE) -> float:
    """Images per second of batched prediction, decoding included (best of ``repeat``)."""
    list(cascade.predict(paths[:BATCH], BATCH, top_k=0, decode=decode))  # warm-up
    best = 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in cascade.predict(paths, BATCH, top_k=0, decode=decode):
            pass
        best = max(best, len(paths) / (time.perf_counter() - start))
    return best


def flat_baseline(split: Path, tree: Hierarchy, feats: dict, sets: list[list], config: TrainConfig, dim: int):
    """One head over every leaf, trained with lcpn's own recipe on the same embeddings; predictions per set."""
    leaves = tree.leaves
    index = {leaf: i for i, leaf in enumerate(leaves)}
    rows = fsio.read_csv(split / "images.csv")
    by_split = {s: [(r["path"], index[r["leaf"]]) for r in rows if r["split"] == s] for s in ("train", "val")}
    data = NodeData("", leaves, by_split["train"], by_split["val"], "")
    stub = artefacts.NodeInfo(node="", classes=leaves, mode="features", head=head_spec(config, dim))
    t0 = time.perf_counter()
    head, _, _ = fit_head(data, feats, stub, config)
    seconds = time.perf_counter() - t0
    predictions = []
    for pairs in sets:
        with torch.no_grad():
            pred = head(torch.stack([feats[p][0] for p, _ in pairs]).float()).argmax(1).tolist()
        predictions.append([leaves[i] for i in pred])
    return predictions, head, seconds


def hiclass_baseline(split: Path, tree: Hierarchy, feats: dict, sets: list[list]) -> list[list[str]]:
    """hiclass's LCPN with scikit-learn's LogisticRegression on standardised embeddings."""
    from hiclass import LocalClassifierPerParentNode
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rows = [r for r in fsio.read_csv(split / "images.csv") if r["split"] == "train" and r["path"] in feats]
    depth = tree.max_depth
    x = np.stack([feats[r["path"]][0].float().numpy() for r in rows])
    y = np.array([list(names_of(r["leaf"])) + [""] * (depth - len(names_of(r["leaf"]))) for r in rows])
    scaler = StandardScaler().fit(x)
    model = LocalClassifierPerParentNode(local_classifier=LogisticRegression(max_iter=3000), n_jobs=1)
    model.fit(scaler.transform(x), y)
    predictions = []
    for pairs in sets:
        xt = np.stack([feats[p][0].float().numpy() for p, _ in pairs])
        predictions.append(["/".join(n for n in row if n) for row in model.predict(scaler.transform(xt))])
    return predictions


def ood_items(ood: Path, levels: str | None, tree: Hierarchy) -> list:
    """The OOD set's labelled images (its labels.csv when the levels come from a CSV), known leaves only."""
    items, _ = scan_csv(ood / "labels.csv", levels.split(","), "path", ood) if levels else scan_tree(ood)
    known = set(tree.leaves)
    return [it for it in items if it.leaf in known]


def confusions(pairs: list[tuple[str, str]], top: int = 12) -> list[dict]:
    """The most frequent (true, predicted) mistakes."""
    counts = Counter((t, p) for t, p in pairs if t != p)
    return [{"true": t, "predicted": p, "images": n} for (t, p), n in counts.most_common(top)]


def parse_options(options: list[str]) -> dict:
    """``KEY=VALUE`` training options for the features-mode run, checked like a config file's values."""
    out = {}
    for option in options:
        key, _, value = option.partition("=")
        key = key.strip().replace("-", "_")
        if key not in OPTIONS:
            raise ValueError(f"unknown option '{key}'; known: {', '.join(OPTIONS)}")
        out[key] = OPTIONS[key].type.convert(value.strip(), None, None)
    return out


def classic_per_image(models: Path, tree: Hierarchy, paths: list[str]) -> float:
    """The classic predict loop: for every image, load each model on its path from disk, then predict."""
    from lcpn.images import open_rgb

    start = time.perf_counter()
    for path in paths:
        image, node = open_rgb(path), ""
        while not tree.is_leaf(node):
            loaded = artefacts.load_node(models / tree.folders[node])  # weights, encoder, transforms
            if loaded.network is None:
                node = tree.children[node][0]
                continue
            with torch.inference_mode():
                logits = loaded.network(loaded.transforms(image).unsqueeze(0))
            node = tree.children[node][int(logits.argmax())]
    return len(paths) / (time.perf_counter() - start)


@dataclass
class FinetuneRun:
    models: Path
    seconds_per_image: float  # training time per image of the slice's first epoch (val pass included)


def finetune_models(split: Path, work: Path, tree: Hierarchy, backbone: str, per_node: int, config: TrainConfig):
    """Finetune-mode artefacts trained on ``per_node`` images of every node: for speed measurements only."""
    sliced = work / f"{split.name}-slice-{backbone}"
    sliced_split(split, sliced, tree, per_node)
    models = split.with_name(f"{split.name}-finetune-{backbone}")
    results = train_nodes(sliced, models, config, force=True, attributes=[])  # the slice has no attribute manifests
    trained = [r for r in results if r.info.history]
    images = sum(len(fsio.read_csv(sliced / tree.folders[r.node] / "train.csv")) for r in trained)
    return FinetuneRun(models, sum(r.info.history[0]["seconds"] for r in trained) / images)


def time_b4_step(split: Path, tree: Hierarchy) -> float:
    """Seconds of one finetune training step of EfficientNet-B4 at 380 px on 16 real images (after a warm-up step)."""
    from lcpn.images import open_rgb
    from lcpn.recipe import data_config_for
    from lcpn.transforms import train_transform

    config = TrainConfig().resolved()  # the trainer's defaults: B4, 380 px, batch 16, finetune's lr
    rows = fsio.read_csv(split / tree.folders[""] / "train.csv")[: config.batch_size]
    transform = train_transform(data_config_for(config))
    x = torch.stack([transform(open_rgb(r["path"])) for r in rows]).contiguous(memory_format=torch.channels_last)
    y = torch.zeros(len(rows), dtype=torch.long)
    model = backbones.create(config.backbone, len(tree.children[""]), pretrained=False)
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
    return seconds[-1]


def sliced_split(split: Path, out: Path, tree: Hierarchy, per_node: int) -> None:
    """A copy of the split with at most ``per_node`` train and val images per node."""
    fsio.write_text(out / "hierarchy.json", (split / "hierarchy.json").read_text(encoding="utf-8"))
    for node in tree.parents:
        for name, limit in (("train.csv", per_node), ("val.csv", per_node)):
            rows = fsio.read_csv(split / tree.folders[node] / name)
            rows = rows[:: max(1, len(rows) // limit)][:limit]
            fsio.write_csv(out / tree.folders[node] / name, ("path", "sha256", "label"),
                           ([r["path"], r["sha256"], r["label"]] for r in rows))  # fmt: skip


def measure_speed(split: Path, work: Path, tree: Hierarchy, models: Path, cascade: Cascade, flat_head, test_paths):
    """Throughput of every predictor, training-time estimates, and bf16 against fp32 on the test split."""
    truth = [it.leaf for it in split_test_items(split)]
    backbone = next(n for n in cascade.nodes.values() if isinstance(n, HeadNode)).backbone
    log("precision: bf16 vs fp32 paths on the test split")
    fp32 = Cascade.load(models, "cpu", "fp32")
    bf16 = Cascade.load(models, "cpu", "bf16")
    p32 = [p.node for p in fp32.predict(test_paths, BATCH)]
    p16 = [p.node for p in bf16.predict(test_paths, BATCH)]
    agreement = sum(a == b for a, b in zip(p32, p16)) / len(test_paths)

    log("throughput: features cascade, flat single forward")
    tp_features = throughput(cascade, test_paths, repeat=2)
    flat_tree = Hierarchy.from_leaves([leaf.replace("/", "|") for leaf in tree.leaves])
    flat = Cascade(flat_tree, {"": HeadNode([names_of(n)[-1] for n in flat_tree.children[""]], flat_head, backbone)})
    tp_single = throughput(flat, test_paths, repeat=2)

    log("finetune mode, Lite0: one epoch on a slice of every node, then throughput")
    lite = finetune_models(
        split, work, tree, FINETUNE_LITE, SLICE, TrainConfig(backbone=FINETUNE_LITE, epochs=1, workers=2)
    )
    # Greedy, as the classic loop: these barely trained models give near-uniform probabilities, for
    # which a best-path search visits much of the tree (trained models are far more decisive).
    tp_finetune_lite = throughput(Cascade.load(lite.models, "cpu", "auto"), test_paths[: BATCH * 6], decode="greedy")
    tp_classic_lite = classic_per_image(lite.models, tree, test_paths[:CLASSIC_IMAGES])
    epoch_images = sum(len(fsio.read_csv(split / tree.folders[n] / "train.csv")) for n in tree.trainable)

    log("finetune mode, B4 (the trainer's default) at 380 px: one step per node, then throughput")
    b4_config = TrainConfig(backbone="efficientnet-b4", pretrained=False, epochs=1, batch_size=2, workers=0)
    b4 = finetune_models(split, work, tree, "efficientnet-b4", 2, b4_config)
    tp_finetune_b4 = throughput(Cascade.load(b4.models, "cpu", "auto"), test_paths[: BATCH * 2], decode="greedy")
    tp_classic_b4 = classic_per_image(b4.models, tree, test_paths[:CLASSIC_IMAGES_B4])
    b4_step = time_b4_step(split, tree)
    b4_steps = sum(-(-len(fsio.read_csv(split / tree.folders[n] / "train.csv")) // 16) for n in tree.trainable)
    return {
        "throughput": {
            "cascade_features": tp_features,
            "cascade_finetune": tp_finetune_b4,
            "classic_per_image": tp_classic_b4,
            "single_forward": tp_single,
            "cascade_finetune_lite0": tp_finetune_lite,
            "classic_per_image_lite0": tp_classic_lite,
        },
        "train_seconds": {
            "finetune_epoch_estimate": b4_step * b4_steps,
            "finetune_epoch_estimate_lite0": lite.seconds_per_image * epoch_images,
        },
        "finetune_estimate_basis": {
            "b4_seconds_per_step_of_16": b4_step,
            "b4_steps_per_epoch": b4_steps,
            "lite0_seconds_per_image": lite.seconds_per_image,
        },
        "precision": {
            "bf16_fp32_path_agreement": agreement,
            "fp32_path_accuracy": path_accuracy(truth, p32),
            "bf16_path_accuracy": path_accuracy(truth, p16),
            "bf16_in_use": backbone.runtime.bf16,
        },
    }


def attribute_labels(csv_file: Path | None, data: Path) -> Path | None:
    """The CSV that holds the attribute columns: --csv, else the data folder's labels.csv (None: no attributes)."""
    path = csv_file or data / "labels.csv"
    return path if path.is_file() else None


def parse_attribute_options(options: list[str]) -> dict[str, dict]:
    """``NAME:KEY=VALUE`` -> {attribute: {key: value}}, each option checked as ``parse_options`` does."""
    out: dict[str, dict] = {}
    for option in options:
        name, sep, pair = option.partition(":")
        if not sep or name not in ATTRIBUTES:
            raise ValueError(f"'{option}' is not NAME:KEY=VALUE with NAME one of {', '.join(ATTRIBUTES)}")
        out.setdefault(name, {}).update(parse_options([pair]))
    return out


def train_attributes(split: Path, models: Path, config: TrainConfig, own: dict[str, dict]) -> float:
    """Train the attribute heads beside the trained tree, each with its ``own`` options; the seconds they took."""
    log(f"attributes: train {', '.join(ATTRIBUTES)} heads (embedding cache warm)")
    t0 = time.perf_counter()
    # one run for the attributes on the shared options (the store is read once), one more per attribute with its own
    plain = [name for name in ATTRIBUTES if name not in own]
    if plain:
        train_nodes(split, models, config, nodes=None, attributes=plain, force=True)
    for name, options in own.items():
        train_nodes(split, models, config.replace(**options), nodes=None, attributes=[name], force=True)
    return time.perf_counter() - t0


def attribute_scores(test: dict, ood: dict) -> dict:
    """{name: {accuracy, macro_f1, n, accuracy_ood, macro_f1_ood, n_ood}} from two evaluations' metrics."""
    scores = {}
    for name in ATTRIBUTES:
        on_test, on_ood = test["attributes"][name], ood.get("attributes", {}).get(name, {})
        scores[name] = {"accuracy": on_test["accuracy"], "macro_f1": on_test["macro_f1"], "n": on_test["n"],
                        "accuracy_ood": on_ood.get("accuracy"), "macro_f1_ood": on_ood.get("macro_f1"),
                        "n_ood": on_ood.get("n")}  # fmt: skip
    return scores


def evaluate_with_greedy(cascade: Cascade, items: list, out: Path) -> tuple[EvaluationResult, list[str]]:
    """``lcpn evaluate``'s result (best-path, written to ``out``) and greedy routing's leaf per image
    that was predicted, decoded from the same probabilities (no second pass over the images)."""
    greedy = {}

    def decode_greedily(batch, probs, indices):
        greedy.update(zip(indices, cascade.greedy_leaves(batch, probs, range(len(indices)))))

    result = evaluate(cascade, items, out, BATCH, on_batch=decode_greedily)
    return result, [greedy[i] for i, (_, p) in enumerate(result.predictions) if p.error is None]


def measure_attributes_speed(models: Path, paths: list[str], repeat: int = 3) -> dict:
    """Prediction throughput with and without the attribute heads on the first SPEED_IMAGES of ``paths``.

    The two cascades take turns, best of ``repeat`` each, so a busy machine slows both alike.
    """
    log("attributes: prediction throughput with and without them")
    paths = paths[:SPEED_IMAGES]
    cascades = {"with": Cascade.load(models, "cpu"), "without": Cascade.load(models, "cpu", attributes=False)}
    best = dict.fromkeys(cascades, 0.0)
    for _ in range(repeat):
        best = {name: max(best[name], throughput(cascade, paths)) for name, cascade in cascades.items()}
    return {"throughput_without_attributes": best["without"], "throughput_with_attributes": best["with"],
            "added_prediction_time": best["without"] / best["with"] - 1, "speed_images": len(paths)}  # fmt: skip


def print_attributes(bench: dict) -> None:
    if not bench.get("attributes"):
        return
    print()
    header = ["attribute", "test images", "accuracy", "macro F1", "OOD accuracy", "OOD macro F1"]
    rows = [[name, a["n"], a["accuracy"], a["macro_f1"], a["accuracy_ood"], a["macro_f1_ood"]]
            for name, a in bench["attributes"].items()]  # fmt: skip
    print(format_table(rows, header))
    print(format_table([[k, v] for k, v in bench["attributes_speed"].items()], ["attributes_speed", ""]))


def measure_export(models: Path, split: Path, work: Path) -> dict:
    """ONNX float32 and int8 exports of ``models`` against torch's default precision on the split's test images."""
    from lcpn.export import export

    test_items = split_test_items(split)
    paths, truth = [it.path for it in test_items], [it.leaf for it in test_items]
    log("export: ONNX float32 and int8, then paths and throughput against torch")
    folders = {"fp32": work / "export-fp32", "int8": work / "export-int8"}
    manifests = {kind: export(models, folder, quantize=None if kind == "fp32" else kind)
                 for kind, folder in folders.items()}  # fmt: skip
    cascades = {"torch_default": Cascade.load(models, "cpu")}  # attributes too, as the export holds them
    cascades |= {f"onnx_{kind}": open_cascade(folder, "onnx") for kind, folder in folders.items()}
    predicted = {name: [p.node for p in cascade.predict(paths, BATCH)] for name, cascade in cascades.items()}
    result = {}
    for kind in folders:
        agreeing = sum(a == b for a, b in zip(predicted[f"onnx_{kind}"], predicted["torch_default"]))
        result[f"agreement_{kind}"] = agreeing / len(paths)
        result[f"path_accuracy_{kind}"] = path_accuracy(truth, predicted[f"onnx_{kind}"])
    result["path_accuracy_torch_default"] = path_accuracy(truth, predicted["torch_default"])
    timed = paths[:: max(1, len(paths) // EXPORT_THROUGHPUT)][:EXPORT_THROUGHPUT]  # test.csv is sorted by leaf
    result["throughput"] = {name: throughput(cascade, timed, repeat=2) for name, cascade in cascades.items()}
    result["file_mib"] = {kind: {name: (folders[kind] / name).stat().st_size / 2**20 for name in m["models"]}
                          for kind, m in manifests.items()}  # fmt: skip
    result["n_test_images"] = len(paths)
    result["n_throughput_images"] = len(timed)
    result["models"] = str(models)
    return result


def trained_split(models: Path) -> Path:
    """The split a model folder was trained on (its hierarchy.json records it)."""
    return Path(json.loads((models / "hierarchy.json").read_text(encoding="utf-8"))["split"])


def export_only(models: Path, out: Path, work: Path) -> None:
    """``--export-only``: the export part alone, on an existing model folder and the split it was trained on."""
    bench = {"export": measure_export(models, trained_split(models), work), "cpu_count": torch.get_num_threads()}
    fsio.write_json(out, bench)
    print_export(bench["export"])
    print(f"\nwrote {out}")


def attributes_speed_only(models: Path, out: Path) -> None:
    """``--attributes-speed-only``: throughput with and without the attribute heads of an existing model folder."""
    paths = [it.path for it in split_test_items(trained_split(models))]
    bench = {"attributes_speed": measure_attributes_speed(models, paths), "cpu_count": torch.get_num_threads(),
             "processor": platform.processor(), "models": str(models)}  # fmt: skip
    fsio.write_json(out, bench)
    print(format_table([[k, v] for k, v in bench["attributes_speed"].items()], ["attributes_speed", ""]))
    print(f"\nwrote {out}")


def print_export(result: dict) -> None:
    print(format_table([[k, v] for k, v in result.items() if not isinstance(v, dict)], ["export", ""]))
    for key, title in (("throughput", "images/s"), ("file_mib", "MiB")):
        print()
        print(format_table([[k, v] for k, v in result[key].items()], [key, title]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a labelled folder tree")
    parser.add_argument("--csv", type=Path, help="labels CSV (paths relative to --data)")
    parser.add_argument("--levels", help="with --csv: the label columns, top level first")
    parser.add_argument("--workdir", type=Path, default=REPO / "bench_work", help="split, cache and models")
    parser.add_argument("--out", type=Path, default=REPO / "bench.json")
    parser.add_argument("--ood", type=Path, default=DEFAULT_OOD, help="an out-of-distribution labelled folder tree "
                        "(with labels.csv for --levels); evaluated, never trained on")  # fmt: skip
    parser.add_argument("--no-ood", action="store_true", help="skip the out-of-distribution evaluation")
    parser.add_argument("--accuracy-only", action="store_true",
                        help="skip the speed measurements (to compare training recipes quickly)")  # fmt: skip
    parser.add_argument("--no-attributes", action="store_true",
                        help="train and score no attribute heads (they do not depend on the levels)")  # fmt: skip
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a features-mode training option (e.g. head=linear, stage_features=0)")  # fmt: skip
    parser.add_argument("--attribute-option", action="append", default=[], metavar="NAME:KEY=VALUE",
                        help="a training option of one attribute's head (e.g. gender:class_weights=false)")  # fmt: skip
    parser.add_argument("--export-only", type=Path, metavar="MODELS",
                        help="measure only the ONNX export of this trained model folder, on the test images of "
                        "the split it was trained on, and write just that to --out")  # fmt: skip
    parser.add_argument("--attributes-speed-only", type=Path, metavar="MODELS",
                        help="measure only the prediction throughput of this trained model folder with and "
                        "without its attribute heads, on test images of its split; write just that to --out",
                        )  # fmt: skip
    args = parser.parse_args()
    if args.export_only:
        export_only(args.export_only, args.out, args.workdir)
        return
    if args.attributes_speed_only:
        attributes_speed_only(args.attributes_speed_only, args.out)
        return
    if args.csv and not args.levels:
        parser.error("--csv needs --levels (the label columns, top level first)")
    if not args.no_ood and not args.ood.is_dir():
        parser.error(f"the OOD folder '{args.ood}' does not exist (give --ood DIR or --no-ood)")
    try:
        options = parse_options(args.option)
        attribute_options = parse_attribute_options(args.attribute_option)
    except (ValueError, click.BadParameter) as exc:
        parser.error(str(exc))
    started = time.perf_counter()
    work = args.workdir
    split = work / ("split_" + ("csv_" + args.levels.replace(",", "-") if args.csv else "folders"))

    log(f"prepare {args.data}")
    try:
        if args.csv:
            items, excluded = scan_csv(args.csv, args.levels.split(","), "path", args.data)
        else:
            items, excluded = scan_tree(args.data)
    except SourceError as exc:
        parser.error(str(exc))
    labels = attribute_labels(args.csv, args.data)
    if labels:
        items = with_attributes(items, labels, ATTRIBUTES, "path", args.data)
    prepare(items, excluded, split, str(args.data), attributes=ATTRIBUTES if labels else ())
    tree = Hierarchy.load(split / "hierarchy.json")
    test_items = split_test_items(split)
    test = [(it.path, it.leaf) for it in test_items]
    test_paths = [p for p, _ in test]

    config = TrainConfig(**{"mode": "features", "device": "cpu",
                            "cache": str(work / "embeddings"), **options}).resolved()  # fmt: skip
    ood = [] if args.no_ood else ood_items(args.ood, args.levels, tree)
    models = split.with_name(split.name + "-features")
    log("embed every image once: the cache that features mode and the baselines train from")
    backbone, key = open_backbone(config)
    views = {r["path"]: config.views if r["split"] == "train" else 1 for r in fsio.read_csv(split / "images.csv")}
    views |= {it.path: 1 for it in ood}
    t0 = time.perf_counter()
    feats = embed_images(list(views), backbone, EmbeddingStore(work / "embeddings", key), views, BATCH)
    embed_seconds = time.perf_counter() - t0
    log("train features mode (embedding cache warm)")
    shutil.rmtree(models, ignore_errors=True)  # a fresh folder: another recipe's attribute heads would pin its backbone
    t0 = time.perf_counter()
    train_nodes(split, models, config, force=True, attributes=[])
    features_seconds = time.perf_counter() - t0
    with_heads = labels is not None and not args.no_attributes  # the split records the values either way
    attributes_seconds = train_attributes(split, models, config, attribute_options) if with_heads else None
    if with_heads and ood and (args.ood / "labels.csv").is_file():
        ood = with_attributes(ood, args.ood / "labels.csv", ATTRIBUTES, "path", args.ood)

    # One evaluation per set: the attributes and greedy routing come from the same pass.
    log("evaluate lcpn on the test split")
    cascade = Cascade.load(models, "cpu")
    lcpn_eval, y_greedy = evaluate_with_greedy(cascade, test_items, models / "evaluation")
    y_true = [it.leaf for it, p in lcpn_eval.predictions if p.error is None]
    y_lcpn = [p.node for _, p in lcpn_eval.predictions if p.error is None]
    if ood:
        log(f"evaluate lcpn on the OOD set ({len(ood)} images)")
        ood_eval, ood_greedy = evaluate_with_greedy(cascade, ood, models / "evaluation-ood")
        ood_pairs = [(it.leaf, p.node) for it, p in ood_eval.predictions if p.error is None]

    log("baselines on the same embeddings")
    dim = backbone.embedder.dim  # the embedding pass's: the loaded one adds colour when an attribute reads it
    ood_pairs_in = [(it.path, it.leaf) for it in ood]
    sets = [test, ood_pairs_in] if ood else [test]
    flat_preds, flat_head, flat_seconds = flat_baseline(split, tree, feats, sets, config, dim)
    hiclass_preds = hiclass_baseline(split, tree, feats, sets)
    y_flat, y_hiclass = flat_preds[0], hiclass_preds[0]
    truth = [leaf for _, leaf in test]

    speed = {}
    if not args.accuracy_only:
        category_only = Cascade.load(models, "cpu", attributes=False)  # the category path's speed, as before attributes
        speed = measure_speed(split, work, tree, models, category_only, flat_head, test_paths)
        speed["export"] = measure_export(models, split, work)
    speed.setdefault("train_seconds", {}).update(
        features_all_nodes=features_seconds, embedding_all_images=embed_seconds, flat_head=flat_seconds
    )

    attributes, attributes_speed = None, None
    if with_heads:
        attributes = attribute_scores(lcpn_eval.metrics, ood_eval.metrics if ood else {})
        attributes_speed = {"train_seconds": attributes_seconds}
        if not args.accuracy_only:
            attributes_speed.update(measure_attributes_speed(models, test_paths))
    depth_keys = [f"level_{d}" for d in range(1, tree.max_depth + 1)]
    bench = {
        "data": str(args.csv or args.data) + (f" [{args.levels}]" if args.levels else ""),
        "levels": tree.max_depth,
        "n_test_images": len(test),
        "accuracy": {
            "lcpn": accuracy_row(y_true, y_lcpn),
            "lcpn_greedy": accuracy_row(y_true, y_greedy),
            "flat": accuracy_row(truth, y_flat),
            "hiclass": accuracy_row(truth, y_hiclass),
        },
        "accuracy_ood": {
            "lcpn": accuracy_row(*zip(*ood_pairs)),
            "lcpn_greedy": accuracy_row([t for t, _ in ood_pairs], ood_greedy),
            "flat": accuracy_row([leaf for _, leaf in ood_pairs_in], flat_preds[1]),
            "hiclass": accuracy_row([leaf for _, leaf in ood_pairs_in], hiclass_preds[1]),
        }
        if ood
        else None,
        "ood": {
            "data": str(args.ood),
            "n_images": len(ood),
            "left_out": ood_eval.metrics.get("left_out"),
            "confusions": confusions(ood_pairs),
            "worst_leaves": worst_leaves(ood_eval.metrics["leaves"])[:WORST_LEAVES],
        }
        if ood
        else None,
        **speed,
        "attributes": attributes,
        "attributes_speed": attributes_speed,
        "lcpn_metrics": {k: lcpn_eval.metrics[k] for k in ("hierarchical", "mistake_severity", "path_accuracy")},
        "machine": {
            "cpu_count": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "processor": platform.processor(),
        },  # fmt: skip
        "config": {
            "backbone": config.backbone,
            "head": head_spec(config, dim),
            "batch_size": BATCH,
            "views": config.views,
            "stage_features": config.stage_features,
            "square": config.square,
            "options": options,
            "attribute_options": attribute_options,
        },
        "wall_seconds": time.perf_counter() - started,
    }
    fsio.write_json(args.out, bench)

    ood_rows = bench["accuracy_ood"] or {}
    print(format_table([[name, *(row.get(k) for k in depth_keys), row["path"], row["hf"],
                         (ood_rows.get(name) or {}).get("path")]
                        for name, row in bench["accuracy"].items()],
                       ["", *depth_keys, "path", "hF1", "OOD path"]))  # fmt: skip
    for key, title in (("throughput", "images/s"), ("train_seconds", "seconds"), ("precision", "")):
        if key in bench:
            print()
            print(format_table([[k, v] for k, v in bench[key].items()], [key, title]))
    print_attributes(bench)
    if "export" in bench:
        print()
        print_export(bench["export"])
    print(f"\nwall time {bench['wall_seconds']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
