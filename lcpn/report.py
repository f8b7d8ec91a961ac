"""Per-node performance reports: a text file and four plots that show where a node fails."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, accuracy_score, classification_report  # noqa: E402
from tabulate import tabulate  # noqa: E402

from . import fsio  # noqa: E402
from .images import ImageError, open_rgb  # noqa: E402

MAX_WRONG = 16  # misclassified images shown in wrong_plot.png
REPORT_FILES = ("performance.txt", "confusion_matrix.png", "class_plot.png", "error_plot.png", "wrong_plot.png")


@dataclass
class Outcome:
    """A node's predictions on its evaluation images (val, or train when there is no val)."""

    classes: list[str]
    paths: list[str]
    y_true: list[int]
    y_pred: list[int]
    confidence: list[float]
    evaluated_on: str = "val"
    note: str = ""  # a line for performance.txt about how the figures relate to the saved model
    # the class mix the model expects (its mean probability on its training images; label_shift)
    prior: list[float] | None = None

    @property
    def accuracy(self) -> float:
        return float(accuracy_score(self.y_true, self.y_pred)) if self.y_true else float("nan")


def write_node_report(
    folder: Path, node_title: str, outcome: Outcome, history: list[dict], counts: dict[str, list[int]]
) -> dict:
    """Write performance.txt and the plots; return the metrics for node.json."""
    folder.mkdir(parents=True, exist_ok=True)
    text, confusion, classes, errors, wrong = (folder / name for name in REPORT_FILES)
    metrics = performance_text(text, node_title, outcome)
    confusion_plot(confusion, node_title, outcome)
    class_plot(classes, node_title, outcome.classes, counts)
    error_plot(errors, node_title, history)
    wrong_plot(wrong, node_title, outcome)
    return metrics


def performance_text(path: Path, node_title: str, o: Outcome) -> dict:
    labels = list(range(len(o.classes)))
    if not o.y_true:
        fsio.write_text(path, f"{node_title}\n\nNo images to evaluate on.\n")
        return {"accuracy": None, "n": 0}
    text = classification_report(o.y_true, o.y_pred, labels=labels, target_names=o.classes, digits=4, zero_division=0)
    report = classification_report(
        o.y_true, o.y_pred, labels=labels, target_names=o.classes, output_dict=True, zero_division=0
    )
    wrong = sum(t != p for t, p in zip(o.y_true, o.y_pred))
    header = (
        f"{node_title}\n"
        f"evaluated on: {o.evaluated_on} ({len(o.y_true)} images)\n"
        f"accuracy: {o.accuracy:.4f} ({wrong} wrong)\n" + (f"note: {o.note}\n" if o.note else "") + "\n"
    )
    fsio.write_text(path, header + text)
    return {
        "accuracy": o.accuracy,
        "macro_f1": report["macro avg"]["f1-score"],
        "n": len(o.y_true),
        "evaluated_on": o.evaluated_on,
        "per_class": {c: {k: report[c][k] for k in ("precision", "recall", "f1-score", "support")} for c in o.classes},
        **({"prior": o.prior} if o.prior is not None else {}),
    }


def save_figure(fig: plt.Figure, path: Path) -> None:
    """A figure as a PNG file (atomic), then closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    fsio.write_bytes(path, buf.getvalue())


def confusion_plot(path: Path, title: str, o: Outcome) -> None:
    n = len(o.classes)
    size = min(24.0, max(4.0, 0.45 * n + 2.5))
    fig, ax = plt.subplots(figsize=(size, size))
    if o.y_true:
        ConfusionMatrixDisplay.from_predictions(
            o.y_true, o.y_pred, labels=list(range(n)), display_labels=o.classes, ax=ax,
            colorbar=False, cmap="Blues", xticks_rotation=90 if n > 4 else 0,
        )  # fmt: skip
    else:
        ax.text(0.5, 0.5, "no images to evaluate", ha="center")
    ax.set_title(f"{title}: confusion matrix ({o.evaluated_on})")
    save_figure(fig, path)


def class_plot(path: Path, title: str, classes: list[str], counts: dict[str, list[int]]) -> None:
    """Images per class in each split: the imbalance the node was trained with."""
    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * n + 2), 4))
    x = np.arange(n)
    width = 0.8 / max(1, len(counts))
    for i, (split, values) in enumerate(counts.items()):
        bars = ax.bar(x + i * width, values, width, label=split)
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(
        x + width * (len(counts) - 1) / 2,
        classes,
        rotation=45 if n > 4 else 0,
        ha="right" if n > 4 else "center",
    )
    ax.set_ylabel("images")
    ax.set_title(f"{title}: class distribution")
    ax.legend()
    save_figure(fig, path)


def error_plot(path: Path, title: str, history: list[dict]) -> None:
    """Loss and accuracy per epoch for train and val."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    by_c = bool(history) and "C" in history[0]  # a logistic-regression head: one point per L2 strength
    epochs = [h["C"] if by_c else h["epoch"] for h in history]
    for key, axis in (("loss", left), ("acc", right)):
        for split, style in (("train", "-o"), ("val", "-s")):
            values = [h.get(f"{split}_{key}") for h in history]
            if any(v is not None for v in values):
                axis.plot(epochs, [np.nan if v is None else v for v in values], style, label=split, markersize=3)
        if by_c:
            axis.set_xscale("log")
            axis.set_xlabel("C (inverse L2 strength)")
        else:
            axis.set_xlabel("epoch")
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel("accuracy" if key == "acc" else "loss")
        axis.grid(alpha=0.3)
        if axis.lines:  # a logistic-regression head records no train loss
            axis.legend()
    best = [x for x, h in zip(epochs, history) if h.get("best")]
    if best:
        for axis in (left, right):
            axis.axvline(best[-1], color="grey", linestyle="--", linewidth=1)
    what = (
        "regularisation path (dashed line: chosen C)" if by_c else "training curves (dashed line: best epoch, restored)"
    )
    fig.suptitle(f"{title}: {what}")
    save_figure(fig, path)


def wrong_plot(path: Path, title: str, o: Outcome, limit: int = MAX_WRONG) -> None:
    """A grid of misclassified images, most confident mistakes first, with true and predicted class."""
    wrong = [i for i, (t, p) in enumerate(zip(o.y_true, o.y_pred)) if t != p]
    wrong.sort(key=lambda i: -o.confidence[i])
    wrong = wrong[:limit]
    cols = min(4, max(1, len(wrong)))
    rows = max(1, math.ceil(len(wrong) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if not wrong:
        axes[0, 0].text(0.5, 0.5, f"no misclassified {o.evaluated_on} images", ha="center", va="center")
    for ax, i in zip(axes.flat, wrong):
        try:
            ax.imshow(open_rgb(o.paths[i]))
        except ImageError:
            ax.text(0.5, 0.5, "unreadable", ha="center")
        ax.set_title(
            f"true: {o.classes[o.y_true[i]]}\npred: {o.classes[o.y_pred[i]]} ({o.confidence[i]:.2f})",
            fontsize=8, color="firebrick",
        )  # fmt: skip
    fig.suptitle(f"{title}: misclassified {o.evaluated_on} images ({len(wrong)} shown)")
    save_figure(fig, path)


def format_table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """An aligned text table; floats with 4 decimals, missing values as '-'."""
    return tabulate(rows, headers=list(header), floatfmt=".4f", missingval="-", disable_numparse=False)
