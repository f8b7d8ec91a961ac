"""Predictions as text lines, JSON lines or CSV rows, written as they come.

With attribute models, JSON lines carry ``attributes`` ({name: {label, confidence, top_k}}), CSV
rows a ``<name>`` and a ``<name>_confidence`` column per attribute, and text lines
``| name: label (confidence)`` after the path.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from typing import TextIO

from .cascade import Prediction

FORMATS = ("text", "json", "csv")


def write_predictions(
    predictions: Iterable[Prediction], fmt: str, depth: int, top_k: int, out: TextIO, attributes: Sequence[str] = ()
) -> int:
    """Write each prediction to ``out`` in ``fmt`` for a tree ``depth`` levels deep; return how many failed.

    ``attributes`` names the attribute columns of the CSV format.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format '{fmt}'; choose {', '.join(FORMATS)}")
    rows = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
    if rows:
        rows.writerow(csv_header(depth, attributes))
    failed = 0
    for pred in predictions:
        failed += pred.error is not None
        if rows:
            rows.writerow(csv_row(pred, depth, top_k, attributes))
        else:
            out.write((json_line(pred) if fmt == "json" else text_line(pred, top_k)) + "\n")
    out.flush()
    return failed


def text_line(pred: Prediction, top_k: int) -> str:
    if pred.error:
        return f"{pred.image}  ERROR: {pred.error}"
    line = f"{pred.image}  " + " > ".join(f"{n} ({c:.2f})" for n, c in zip(pred.path, pred.confidences))
    if pred.stopped_early:
        line += "  [stopped early]"
    if pred.attributes:
        line += "  | " + ", ".join(f"{n}: {a['label']} ({a['confidence']:.2f})" for n, a in pred.attributes.items())
    if top_k > 1:
        line += "  | top-k: " + "; ".join(f"{' > '.join(t['path'])} {t['probability']:.3f}" for t in pred.top_k)
    return line


def json_line(pred: Prediction) -> str:
    return json.dumps(pred.to_dict(), ensure_ascii=False)


def csv_header(depth: int, attributes: Sequence[str] = ()) -> list[str]:
    levels = range(1, depth + 1)
    return ["image", *(f"level_{d}" for d in levels), *(f"confidence_{d}" for d in levels),
            "path_probability", "stopped_early", "top_k", *(c for a in attributes for c in (a, f"{a}_confidence")),
            "error"]  # fmt: skip


def csv_row(pred: Prediction, depth: int, top_k: int, attributes: Sequence[str] = ()) -> list[object]:
    pad = [""] * (depth - len(pred.path))
    found = pred.attributes or {}
    return [
        pred.image, *pred.path, *pad, *(f"{c:.6f}" for c in pred.confidences), *pad,
        "" if pred.error else f"{pred.path_probability:.6f}", pred.stopped_early,
        json.dumps(pred.to_dict()["top_k"], ensure_ascii=False) if top_k else "",
        *(v for a in attributes for v in ((found[a]["label"], f"{found[a]['confidence']:.6f}") if a in found
                                          else ("", ""))),
        pred.error or "",
    ]  # fmt: skip
