"""Hierarchical metrics: pure functions on label paths given as node ids (``a/x/p``).

A predicted id may be shorter than the true one (the cascade stopped early) or empty (nothing
predicted). Node ids are path-qualified, so ``a/Other`` and ``b/Other`` never count as a match.
"""

from __future__ import annotations

from collections.abc import Sequence

from sklearn.metrics import f1_score, precision_recall_fscore_support

from .hierarchy import ancestors, depth_of, names_of, node_id, tree_distance

NONE = "(none)"  # the label of a level the prediction did not reach


def prefix(node: str, depth: int) -> str:
    """The ancestor of ``node`` at ``depth`` (the node itself if deep enough), or NONE."""
    names = names_of(node)
    return node_id(names[:depth]) if len(names) >= depth else NONE


def path_accuracy(y_true: Sequence[str], y_pred: Sequence[str]) -> float:
    return sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true) if y_true else float("nan")


def level_scores(y_true: Sequence[str], y_pred: Sequence[str]) -> list[dict]:
    """Accuracy and macro F1 at every depth, over the images whose true path reaches that depth."""
    out = []
    max_depth = max((depth_of(t) for t in y_true), default=0)
    for d in range(1, max_depth + 1):
        pairs = [(prefix(t, d), prefix(p, d)) for t, p in zip(y_true, y_pred) if depth_of(t) >= d]
        truth = [t for t, _ in pairs]
        pred = [p for _, p in pairs]
        out.append({
            "depth": d,
            "n": len(pairs),
            "accuracy": sum(t == p for t, p in pairs) / len(pairs),
            "macro_f1": float(f1_score(truth, pred, labels=sorted(set(truth)), average="macro", zero_division=0)),
        })  # fmt: skip
    return out


def leaf_scores(y_true: Sequence[str], y_pred: Sequence[str], leaves: Sequence[str]) -> list[dict]:
    """Precision, recall, F1 and support of every leaf that is a true or a predicted label, by leaf.

    A prediction that stopped above the leaves counts against the true leaf's recall only. A leaf
    never predicted has precision 0 (not undefined), one never true has recall 0.
    """
    seen = set(y_true) | set(y_pred)
    labels = [leaf for leaf in sorted(leaves) if leaf in seen]
    if not labels:
        return []
    p, r, f, n = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return [
        {"leaf": leaf, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(n[i])}
        for i, leaf in enumerate(labels)
    ]


def attribute_scores(y_true: Sequence[str], y_pred: Sequence[str]) -> dict:
    """One attribute's accuracy, macro F1 (over the values that are true labels) and per-value scores."""
    if not y_true:
        return {"n": 0, "accuracy": None, "macro_f1": None, "values": []}
    labels = sorted(set(y_true) | set(y_pred))
    p, r, f, n = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "n": len(y_true),
        "accuracy": sum(t == q for t, q in zip(y_true, y_pred)) / len(y_true),
        "macro_f1": float(f1_score(y_true, y_pred, labels=sorted(set(y_true)), average="macro", zero_division=0)),
        "values": [
            {"value": v, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(n[i])}
            for i, v in enumerate(labels)
        ],
    }


def hierarchical_prf(y_true: Sequence[str], y_pred: Sequence[str]) -> dict[str, float]:
    """Micro-averaged hierarchical precision, recall and F1 over ancestor sets (root excluded)."""
    overlap = predicted = true = 0
    for t, p in zip(y_true, y_pred):
        ta, pa = set(ancestors(t)), set(ancestors(p))
        overlap += len(ta & pa)
        predicted += len(pa)
        true += len(ta)
    precision = overlap / predicted if predicted else 0.0
    recall = overlap / true if true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def mistake_severity(y_true: Sequence[str], y_pred: Sequence[str]) -> float | None:
    """Mean tree distance between the predicted and the true node, over wrong predictions."""
    wrong = [tree_distance(t, p) for t, p in zip(y_true, y_pred) if t != p]
    return sum(wrong) / len(wrong) if wrong else None


def first_mistake_depth(true: str, pred: str) -> int | None:
    """Depth of the first level where the prediction leaves the true path (None if it never does)."""
    for d in range(1, max(depth_of(true), depth_of(pred)) + 1):
        if prefix(true, d) != prefix(pred, d):
            return d
    return None


def error_propagation(
    y_true: Sequence[str], y_pred: Sequence[str], local: dict[str, tuple[int, int]], parents: Sequence[str]
) -> dict[str, dict]:
    """Per parent node: local accuracy (given the true parent) vs accuracy through the cascade.

    ``local[node] = (correct, n)`` counts the node's own decisions on the images that truly
    belong below it. Through the cascade, an image counts as right at ``node`` only if every
    decision down to the node's child was right. ``from_ancestors`` is the share of the wrong
    final predictions among the node's images whose first mistake was made above the node.
    """
    out = {}
    for node in parents:
        depth = depth_of(node)
        pairs = [(t, p) for t, p in zip(y_true, y_pred) if depth_of(t) > depth and prefix(t, depth) == node]
        if not pairs:
            continue
        cascade = sum(prefix(t, depth + 1) == prefix(p, depth + 1) for t, p in pairs)
        wrong = [(t, p) for t, p in pairs if t != p]
        early = sum(first_mistake_depth(t, p) <= depth for t, p in wrong)
        correct, n = local.get(node, (0, 0))
        out[node or "(root)"] = {
            "n": len(pairs),
            "local_accuracy": correct / n if n else None,
            "cascade_accuracy": cascade / len(pairs),
            "leaf_errors": len(wrong),
            "from_ancestors": early / len(wrong) if wrong else None,
        }
    return out


def summarize(
    y_true: Sequence[str], y_pred: Sequence[str], local: dict[str, tuple[int, int]], parents: Sequence[str]
) -> dict:
    """All of the above in the layout of ``metrics.json``."""
    wrong = [(t, p) for t, p in zip(y_true, y_pred) if t != p]
    began_above = sum(first_mistake_depth(t, p) < depth_of(t) for t, p in wrong)
    return {
        "n_images": len(y_true),
        "levels": level_scores(y_true, y_pred),
        "path_accuracy": path_accuracy(y_true, y_pred),
        "hierarchical": hierarchical_prf(y_true, y_pred),
        "mistake_severity": mistake_severity(y_true, y_pred),
        "error_propagation": {
            "leaf_errors": len(wrong),
            "began_above_last_level": began_above / len(wrong) if wrong else None,
            "nodes": error_propagation(y_true, y_pred, local, parents),
        },
    }
