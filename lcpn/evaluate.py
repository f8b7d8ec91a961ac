"""The ``evaluate`` stage: run the cascade on labelled images and measure it as a whole.

Besides the cascade's own predictions, every node also classifies the images that truly belong
below it (its accuracy given the true parent), reusing the cascade's cached probabilities, so the
report can tell a node's own mistakes from the ones it inherited from above.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from . import fsio
from .hierarchy import ROOT, ancestors, names_of
from .metrics import NONE, prefix, summarize
from .predict import DEFAULT_DECODE, Batch, Cascade, Prediction
from .report import Outcome, confusion_plot, format_table
from .sources import LabelledImage


@dataclass
class EvaluationResult:
    metrics: dict
    predictions: list[tuple[LabelledImage, Prediction]]


def evaluate(
    cascade: Cascade, items: list[LabelledImage], out: Path | None = None, batch_size: int = 32,
    decode: str = DEFAULT_DECODE, min_confidence: float = 0.0,
) -> EvaluationResult:  # fmt: skip
    """Predict ``items``, compute ``metrics.json`` and, if ``out`` is given, write it with the plots."""
    tree = cascade.tree
    known = set(tree.leaves)
    unknown = Counter(it.leaf for it in items if it.leaf not in known)
    items = [it for it in items if it.leaf in known]
    local_hits: dict[str, list[tuple[int, int]]] = defaultdict(list)  # node -> (true child, predicted child)
    extra_seconds = 0.0
    offset = 0

    def per_node(batch: Batch, probs: dict, good: list[int], preds: list[Prediction]) -> None:
        nonlocal extra_seconds, offset
        t0 = time.perf_counter()
        chunk = items[offset : offset + batch_size]  # predict_paths hands over consecutive chunks
        offset += batch_size
        rows = {row: chunk[j] for row, j in enumerate(good)}
        requests = [(row, node) for row, it in rows.items() for node in [ROOT, *ancestors(it.leaf)[:-1]]]
        cascade.node_probabilities(batch, probs, requests)
        for row, node in requests:
            true_child = tree.child_towards(node, rows[row].leaf)
            local_hits[node].append((tree.children[node].index(true_child), int(probs[(row, node)].argmax())))
        extra_seconds += time.perf_counter() - t0

    start = time.perf_counter()
    preds = list(cascade.predict_paths([it.path for it in items], batch_size, 0, decode, min_confidence,
                                       on_batch=per_node))  # fmt: skip
    seconds = time.perf_counter() - start - extra_seconds
    pairs = [(it, p) for it, p in zip(items, preds) if p.error is None]
    failed = [{"path": p.image, "reason": p.error} for p in preds if p.error is not None]
    y_true = [it.leaf for it, _ in pairs]
    y_pred = [p.node for _, p in pairs]
    local = {n: (sum(t == p for t, p in hits), len(hits)) for n, hits in local_hits.items()}
    metrics = summarize(y_true, y_pred, local, tree.parents)
    metrics.update({
        "throughput_images_per_s": len(preds) / seconds if seconds > 0 else None,
        "unknown_classes": dict(sorted(unknown.items())),
        "unreadable": failed,
        "decode": decode,
        "min_confidence": min_confidence,
    })  # fmt: skip
    if out is not None:
        _write(out, metrics, y_true, y_pred, local_hits, cascade)
    return EvaluationResult(metrics, [(it, p) for it, p in zip(items, preds)])


def _write(out: Path, metrics: dict, y_true: list[str], y_pred: list[str], local_hits: dict, cascade: Cascade) -> None:
    tree = cascade.tree
    out.mkdir(parents=True, exist_ok=True)
    fsio.write_json(out / "metrics.json", metrics)
    for level in metrics["levels"]:
        d = level["depth"]
        truth = [prefix(t, d) for t in y_true if len(names_of(t)) >= d]
        pred = [prefix(p, d) for t, p in zip(y_true, y_pred) if len(names_of(t)) >= d]
        labels = sorted(set(truth) | set(pred), key=lambda x: (x == NONE, x))
        index = {lab: i for i, lab in enumerate(labels)}
        outcome = Outcome(labels, [], [index[t] for t in truth], [index[p] for p in pred], [], "test")
        confusion_plot(out / f"confusion_level_{d}.png", f"level {d}", outcome)
    for node, hits in local_hits.items():
        classes = [names_of(c)[-1] for c in tree.children[node]]
        if len(classes) < 2:
            continue
        outcome = Outcome(classes, [], [t for t, _ in hits], [p for _, p in hits], [], "test, true parent given")
        name = tree.folders[node].replace("/", "__")
        confusion_plot(out / "nodes" / f"confusion_{name}.png", node or "(root)", outcome)
    rows = node_rows(metrics)
    header = ["node", "images", "local_accuracy", "cascade_accuracy", "leaf_errors", "from_ancestors"]
    fsio.write_csv(out / "nodes.csv", header, rows)


def node_rows(metrics: dict) -> list[list]:
    return [
        [node, m["n"], m["local_accuracy"], m["cascade_accuracy"], m["leaf_errors"], m["from_ancestors"]]
        for node, m in metrics["error_propagation"]["nodes"].items()
    ]


def format_metrics(metrics: dict) -> str:
    """The printed report: levels, whole-path scores, then the per-node table."""
    h = metrics["hierarchical"]
    lines = [
        f"Images evaluated: {metrics['n_images']}   throughput: {metrics['throughput_images_per_s']:.1f} img/s",
        "",
        format_table(
            [[f"level {lv['depth']}", lv["n"], lv["accuracy"], lv["macro_f1"]] for lv in metrics["levels"]],
            ["", "images", "accuracy", "macro F1"],
        ),
        "",
        f"path accuracy:           {metrics['path_accuracy']:.4f}",
        f"hierarchical P / R / F1: {h['precision']:.4f} / {h['recall']:.4f} / {h['f1']:.4f}",
    ]
    severity = metrics["mistake_severity"]
    ep = metrics["error_propagation"]
    lines.append(f"mistake severity:        {'-' if severity is None else f'{severity:.2f}'} (mean tree distance "
                 f"of wrong predictions)")  # fmt: skip
    if ep["leaf_errors"]:
        lines.append(f"errors that began above the last level: {ep['began_above_last_level']:.1%} "
                     f"of {ep['leaf_errors']}")  # fmt: skip
    lines += ["", "Per node (local: given the true parent; cascade: through the model's own route)",
              format_table(node_rows(metrics), ["node", "images", "local acc", "cascade acc", "leaf errors",
                                                "from ancestors"])]  # fmt: skip
    if metrics["unknown_classes"]:
        lines += ["", "Left out, classes the model does not know:"]
        lines += [f"  {leaf}: {n} image(s)" for leaf, n in metrics["unknown_classes"].items()]
    if metrics["unreadable"]:
        lines += ["", f"Left out, unreadable images: {len(metrics['unreadable'])}"]
        lines += [f"  {u['path']}: {u['reason']}" for u in metrics["unreadable"][:10]]
    return "\n".join(lines)


def split_test_items(split_dir: Path) -> list[LabelledImage]:
    """The global test set of a ``prepare`` output."""
    return [LabelledImage(r["path"], r["label_path"]) for r in fsio.read_csv(split_dir / "test.csv")]
