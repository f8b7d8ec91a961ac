"""The ``evaluate`` stage: run the cascade on labelled images and measure it as a whole.

Besides the cascade's own predictions, every node also classifies the images that truly belong
below it (its accuracy given the true parent), reusing the cascade's cached probabilities, so the
report can tell a node's own mistakes from the ones it inherited from above.

Nothing is left out without a word: files the source scan excluded, unreadable images and images
of classes the model does not know are listed with their reason and counted in ``metrics.json``.
When the models' own split is at hand, images the models were trained on (the same file, or a
near-duplicate) are counted too: their scores say nothing about new photos.

Attributes (gender, colour, ...) are scored on the evaluated images that have a value: accuracy,
macro F1, a per-value table and a confusion matrix each. Images without a value, and values the
model has no class for (rare ones it never saw in training), are counted per attribute.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tabulate import tabulate

from . import fsio
from .attributes import read_specs
from .cascade import DEFAULT_DECODE, Cascade, Prediction
from .hierarchy import ROOT, ancestors, names_of
from .metrics import NONE, attribute_scores, leaf_scores, prefix, summarize
from .models import Batch
from .overlap import PHASH, THUMBNAIL, Fingerprint, TrainingImages
from .report import Outcome, confusion_plot, format_table
from .sources import Excluded, LabelledImage

# Why an image is left out (the keys of metrics.json's "left_out").
EXCLUDED_BY_SOURCE = "excluded by the source"
UNREADABLE = "unreadable image"
UNKNOWN_CLASS = "class unknown to the model"
WORST_LEAVES = 10  # leaves shown in the printed report; leaves.csv has them all
LISTED = 10  # left-out files shown in the printed report; metrics.json has them all


@dataclass
class EvaluationResult:
    metrics: dict
    predictions: list[tuple[LabelledImage, Prediction]]


def evaluate(
    cascade: Cascade, items: list[LabelledImage], out: Path | None = None, batch_size: int = 32,
    decode: str = DEFAULT_DECODE, min_confidence: float = 0.0, excluded: Sequence[Excluded] = (),
    training: TrainingImages | None = None, workers: int | None = None, adapt_priors: bool = False,
    on_batch: Callable[[Batch, dict, list[int]], None] | None = None,
) -> EvaluationResult:  # fmt: skip
    """Predict ``items``, compute ``metrics.json`` and, if ``out`` is given, write it with the plots.

    ``excluded`` are the files the source scan left out; with ``training``, the images are also
    checked against the ones the models were trained on (``training_overlap``). ``workers``:
    the input pipeline's processes (``feed``). With ``adapt_priors`` the paths are decoded from
    probabilities corrected for the images' class mix (``Cascade.predict``), whose estimate per node
    goes to ``estimated_class_mix``; the per-node local accuracy stays the models' own. ``on_batch``
    also sees each batch, its probability cache and the indices of its rows in ``items`` (those of
    a known class), as ``Cascade.predict``'s does: to decode the same probabilities another way
    without running the models again; its time is left out of the throughput.
    """
    tree = cascade.tree
    left_out = [{"path": e.path, "reason": EXCLUDED_BY_SOURCE, "detail": e.reason} for e in excluded]
    known = set(tree.leaves)
    left_out += [{"path": it.path, "reason": UNKNOWN_CLASS, "detail": it.leaf} for it in items if it.leaf not in known]
    unknown = Counter(it.leaf for it in items if it.leaf not in known)
    items = [it for it in items if it.leaf in known]
    local_hits: dict[str, list[tuple[int, int]]] = defaultdict(list)  # node -> (true child, predicted child)
    fingerprints: list[Fingerprint] = []
    extra_seconds = 0.0

    def per_node(batch: Batch, probs: dict, indices: list[int]) -> None:
        nonlocal extra_seconds
        t0 = time.perf_counter()
        requests = [(row, node) for row, i in enumerate(indices) for node in [ROOT, *ancestors(items[i].leaf)[:-1]]]
        cascade.node_probabilities(batch, probs, requests)
        for row, node in requests:
            true_child = tree.child_towards(node, items[indices[row]].leaf)
            local_hits[node].append((tree.children[node].index(true_child), int(probs[(row, node)].argmax())))
        if training is not None:
            phashes = batch.prepared.get(PHASH) or [None] * len(indices)
            thumbs = batch.prepared.get(THUMBNAIL) or [None] * len(indices)
            fingerprints.extend(training.fingerprint(items[i].path, h, t) for i, h, t in zip(indices, phashes, thumbs))
        if on_batch is not None:
            on_batch(batch, probs, indices)
        extra_seconds += time.perf_counter() - t0

    start = time.perf_counter()
    preds = list(
        cascade.predict(
            [it.path for it in items],
            batch_size,
            0,
            decode,
            min_confidence,
            workers,
            on_batch=per_node,
            extra_inputs=training.per_image() if training else None,
            adapt_priors=adapt_priors,
        )
    )
    seconds = time.perf_counter() - start - extra_seconds
    pairs = [(it, p) for it, p in zip(items, preds) if p.error is None]
    left_out += [{"path": p.image, "reason": UNREADABLE, "detail": p.error} for p in preds if p.error is not None]
    y_true = [it.leaf for it, _ in pairs]
    y_pred = [p.node for _, p in pairs]
    local = {n: (sum(t == p for t, p in hits), len(hits)) for n, hits in local_hits.items()}
    metrics = summarize(y_true, y_pred, local, tree.parents)
    metrics.update({
        "leaves": leaf_scores(y_true, y_pred, tree.leaves),
        "throughput_images_per_s": len(preds) / seconds if seconds > 0 else None,
        "training_overlap": training.count(fingerprints) if training is not None else None,
        "left_out": dict(Counter(e["reason"] for e in left_out)),
        "left_out_files": left_out,
        "unknown_classes": dict(sorted(unknown.items())),
        "decode": decode,
        "min_confidence": min_confidence,
        "adapt_priors": adapt_priors,
    })  # fmt: skip
    if adapt_priors:
        metrics["estimated_class_mix"] = {
            node or "root": dict(zip(tree.children[node], (round(p, 6) for p in mix)))
            for node, mix in cascade.estimated_mix.items()
        }
    attribute_pairs = {name: _attribute_pairs(cascade, name, pairs) for name in cascade.attributes}
    if attribute_pairs:
        metrics["attributes"] = {name: {**attribute_scores(*_unzip(truth)), **counts}
                                 for name, (truth, counts) in attribute_pairs.items()}  # fmt: skip
    if out is not None:
        _write(out, metrics, y_true, y_pred, local_hits, cascade)
        for name, (truth, _) in attribute_pairs.items():
            _write_attribute(out, cascade, name, metrics["attributes"][name], truth)
    return EvaluationResult(metrics, [(it, p) for it, p in zip(items, preds)])


def _attribute_pairs(
    cascade: Cascade, name: str, pairs: list[tuple[LabelledImage, Prediction]]
) -> tuple[list[tuple[str, str]], dict]:
    """(true class, predicted value) of one attribute, and the counts of what could not be scored."""
    spec = cascade.attributes[name].spec
    scored, missing, unknown = [], 0, Counter()
    for item, pred in pairs:
        raw = item.attributes.get(name)
        label = None if raw is None else spec.label_of(raw)
        if label is not None:
            scored.append((label, pred.attributes[name]["label"]))
        elif raw is None:
            missing += 1
        else:
            unknown[raw] += 1
    return scored, {"without_value": missing, "unknown_values": dict(sorted(unknown.items()))}


def _unzip(pairs: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    return [t for t, _ in pairs], [p for _, p in pairs]


def _write_attribute(out: Path, cascade: Cascade, name: str, scores: dict, pairs: list[tuple[str, str]]) -> None:
    """``attributes/<name>.csv`` (per value) and ``attributes/confusion_<name>.png``."""
    folder, stem = out / "attributes", Path(cascade.attributes[name].spec.folder).name
    fsio.write_csv(folder / f"{stem}.csv", VALUE_COLUMNS, [[v[c] for c in VALUE_COLUMNS] for v in scores["values"]])
    labels = [v["value"] for v in scores["values"]]
    index = {v: i for i, v in enumerate(labels)}
    outcome = Outcome(labels, [], [index[t] for t, _ in pairs], [index[p] for _, p in pairs], [], "test")
    confusion_plot(folder / f"confusion_{stem}.png", f"attribute {name}", outcome)


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
    header = ["node", "images", "local_accuracy", "cascade_accuracy", "leaf_errors", "from_ancestors"]
    fsio.write_csv(out / "nodes.csv", header, node_rows(metrics))
    fsio.write_csv(out / "leaves.csv", LEAF_COLUMNS, leaf_rows(metrics["leaves"]))


LEAF_COLUMNS = ["leaf", "precision", "recall", "f1", "support"]
VALUE_COLUMNS = ["value", "precision", "recall", "f1", "support"]


def worst_leaves(leaves: list[dict]) -> list[dict]:
    """Leaf scores from the lowest F1 up. At equal F1 the leaf with more true images comes first, so
    the classes a model missed come before those it only named wrongly (support 0: no true image)."""
    return sorted(leaves, key=lambda leaf: (leaf["f1"], -leaf["support"], leaf["leaf"]))


def leaf_rows(leaves: list[dict]) -> list[list]:
    return [[leaf[c] for c in LEAF_COLUMNS] for leaf in leaves]


def node_rows(metrics: dict) -> list[list]:
    return [
        [node, m["n"], m["local_accuracy"], m["cascade_accuracy"], m["leaf_errors"], m["from_ancestors"]]
        for node, m in metrics["error_propagation"]["nodes"].items()
    ]


def format_metrics(metrics: dict) -> str:
    """The printed report: levels, whole-path scores, per node, the worst leaves, and what was left out."""
    h = metrics["hierarchical"]
    ep = metrics["error_propagation"]
    severity = metrics["mistake_severity"]
    scores = [
        ["path accuracy:", f"{metrics['path_accuracy']:.4f}"],
        ["hierarchical P / R / F1:", f"{h['precision']:.4f} / {h['recall']:.4f} / {h['f1']:.4f}"],
        ["mistake severity:", f"{'-' if severity is None else f'{severity:.2f}'} (mean tree distance of wrong "
                              "predictions)"],
    ]  # fmt: skip
    if ep["leaf_errors"]:
        began_above = f"{ep['began_above_last_level']:.1%} of {ep['leaf_errors']}"
        scores.append(["errors that began above the last level:", began_above])
    throughput = metrics["throughput_images_per_s"]
    lines = [
        f"Images evaluated: {metrics['n_images']}   throughput: {throughput or 0:.1f} img/s",
        "",
        format_table(
            [[f"level {lv['depth']}", lv["n"], lv["accuracy"], lv["macro_f1"]] for lv in metrics["levels"]],
            ["", "images", "accuracy", "macro F1"],
        ),
        "",
        tabulate(scores, tablefmt="plain", disable_numparse=True),
        "",
        "Per node (local: given the true parent; cascade: through the model's own route)",
        format_table(node_rows(metrics), ["node", "images", "local acc", "cascade acc", "leaf errors",
                                          "from ancestors"]),
    ]  # fmt: skip
    leaves = worst_leaves(metrics["leaves"])
    if leaves:
        shown = leaves[:WORST_LEAVES]
        lines += ["", f"Leaves with the lowest F1 ({len(shown)} of {len(leaves)}; all of them in leaves.csv)",
                  format_table(leaf_rows(shown), LEAF_COLUMNS)]  # fmt: skip
    if metrics.get("attributes"):
        rows = [[name, a["n"], a["accuracy"], a["macro_f1"], a["without_value"], sum(a["unknown_values"].values())]
                for name, a in metrics["attributes"].items()]  # fmt: skip
        header = ["attribute", "images", "accuracy", "macro F1", "no value", "unknown value"]
        lines += ["", "Attributes (per-value tables in attributes/<name>.csv)", format_table(rows, header)]
    overlap = overlap_warning(metrics)
    if overlap:
        lines += ["", overlap]
    lines += format_left_out(metrics)
    return "\n".join(lines)


def overlap_warning(metrics: dict) -> str | None:
    """A warning when some evaluated images are training images of the models, else None."""
    o = metrics.get("training_overlap")
    if not o or not (o["exact"] or o["near"]):
        return None
    near = f"{o['near']} near-duplicates" if o["near_checked"] else "near-duplicates not checked: no perceptual hashes"
    return (
        f"Warning: {o['exact'] + o['near']} of the images were seen in training ({o['exact']} identical files, "
        f"{near} in the split {o['split']}); their scores overstate how the models do on new photos."
    )


def format_left_out(metrics: dict) -> list[str]:
    """Lines listing what was left out, by reason, then the first files."""
    files = metrics["left_out_files"]
    if not files:
        return []
    lines = ["", f"Left out: {len(files)} file(s)"]
    lines += [f"  {reason}: {n}" for reason, n in metrics["left_out"].items()]
    lines += [f"  {f['path']}: {f['reason']} ({f['detail']})" for f in files[:LISTED]]
    if len(files) > LISTED:
        lines.append(f"  ... and {len(files) - LISTED} more (see metrics.json)")
    return lines


def split_test_items(split_dir: Path) -> list[LabelledImage]:
    """The global test set of a ``prepare`` output, with the attribute values it recorded."""
    names = read_specs(split_dir)
    return [
        LabelledImage(r["path"], r["label_path"], {n: r[n] for n in names if r.get(n)})
        for r in fsio.read_csv(split_dir / "test.csv")
    ]
