#!/usr/bin/env python3
"""Run an `lcpn export` folder with only onnxruntime, numpy and Pillow: the best full path per image.

    python scripts/onnx_predict.py EXPORTED_DIR IMAGE...

Prints one line per image: the class names from the top level down and the path's probability.
No lcpn and no PyTorch needed: copy this file next to the exported folder. `lcpn predict
--runtime onnx` does the same with lcpn's decoders, top-k and checks of the files' sha256.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps


def preprocess(image: Image.Image, data: dict) -> np.ndarray:
    """lcpn's eval transform: the picture made square as ``data["square"]`` says, resized, scaled, normalised."""
    size = data["image_size"]
    if data["square"] == "letterbox":  # pad with white to a centred square first
        side = max(image.size)
        image = ImageOps.pad(image, (side, side), color=(255, 255, 255))
    if data["square"] == "crop":  # shorter side to `size`, then the centre square
        w, h = image.size
        w, h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        left, top = round((w - size) / 2), round((h - size) / 2)
        image = image.resize((w, h), Image.BILINEAR).crop((left, top, left + size, top + size))
    else:
        image = image.resize((size, size), Image.BILINEAR)
    x = np.asarray(image, dtype=np.float32) / 255
    x = (x - np.array(data["mean"], np.float32)) / np.array(data["std"], np.float32)
    return x.transpose(2, 0, 1)  # HWC -> CHW


def best_path(probs: dict[str, np.ndarray], nodes: dict, node: str = "") -> tuple[float, list[str]]:
    """The most probable full path below ``node`` (the product of its probabilities) and that probability."""
    if node not in nodes:  # a leaf
        return 1.0, []
    options = []
    for name, p in zip(nodes[node]["classes"], probs.get(node, [1.0])):  # a constant node has no output
        q, rest = best_path(probs, nodes, f"{node}/{name}" if node else name)
        options.append((float(p) * q, [name, *rest]))
    return max(options, key=lambda option: option[0])


def predict(folder: str | Path, images: list[str]):
    """Yield (image, probability, path) for each image file."""
    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    sessions = {file: ort.InferenceSession(str(folder / file)) for file in manifest["models"]}
    for path in images:
        image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        outputs = {}
        for file, model in manifest["models"].items():  # features mode: one file for every node
            x = preprocess(image, model["data"])[None]
            outputs.update(zip(model["outputs"], sessions[file].run(model["outputs"], {"image": x})))
        probs = {node: outputs[n["output"]][0] for node, n in manifest["nodes"].items() if "output" in n}
        yield (path, *best_path(probs, manifest["nodes"]))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    for image, probability, path in predict(sys.argv[1], sys.argv[2:]):
        print(f"{image}  {' > '.join(path)}  {probability:.3f}")
