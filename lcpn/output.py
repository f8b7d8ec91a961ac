"""Predictions as text lines, JSON lines or CSV rows, written as they come."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from typing import TextIO

from .cascade import Prediction

FORMATS = ("text", "json", "csv")


def write_predictions(predictions: Iterable[Prediction], fmt: str, depth: int, top_k: int, out: TextIO) -> int:
    """Write each prediction to ``out`` in ``fmt`` for a tree ``depth`` levels deep; return how many failed."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format '{fmt}'; choose {', '.join(FORMATS)}")
    rows = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
    if rows:
        rows.writerow(csv_header(depth))
    failed = 0
    for pred in predictions:
        failed += pred.error is not None
        if rows:
            rows.writerow(csv_row(pred, depth, top_k))
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
    if top_k > 1:
        line += "  | top-k: " + "; ".join(f"{' > '.join(t['path'])} {t['probability']:.3f}" for t in pred.top_k)
    return line


def json_line(pred: Prediction) -> str:
    return json.dumps(pred.to_dict(), ensure_ascii=False)


def csv_header(depth: int) -> list[str]:
    levels = range(1, depth + 1)
    return ["image", *(f"level_{d}" for d in levels), *(f"confidence_{d}" for d in levels),
            "path_probability", "stopped_early", "top_k", "error"]  # fmt: skip


def csv_row(pred: Prediction, depth: int, top_k: int) -> list[object]:
    pad = [""] * (depth - len(pred.path))
    return [
        pred.image, *pred.path, *pad, *(f"{c:.6f}" for c in pred.confidences), *pad,
        "" if pred.error else f"{pred.path_probability:.6f}", pred.stopped_early,
        json.dumps(pred.to_dict()["top_k"], ensure_ascii=False) if top_k else "", pred.error or "",
    ]  # fmt: skip
