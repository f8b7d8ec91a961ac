"""Serving an ``lcpn export`` folder with onnxruntime: node models that ``Cascade`` routes like the torch ones.

The folder is checked before anything runs: every file must have the sha256 that ``manifest.json``
records, so a file changed after export is refused. A node model answers the same question as
``models.NetworkNode`` and ``models.HeadNode`` (the child probabilities of some rows of a
``Batch``), so decoding, top-k and ``min_confidence`` are the ``Cascade``'s own. Each ONNX file
runs once per image of a batch, on ``transforms.eval_transform`` pixels, and all its outputs are
cached together: the features graph answers every node from that one run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from . import fsio
from .artefacts import ArtefactError
from .attributes import read_specs
from .export import FORMAT, FORMAT_VERSION, INPUT, MANIFEST
from .models import AttributeModel, Batch, ConstantNode, LoadedModels, NodeModel, read_tree
from .runtime import pixels_key
from .transforms import DataConfig, eval_transform


class OnnxGraph:
    """One exported ONNX file in an onnxruntime session; ``run`` gives all its outputs side by side."""

    def __init__(self, path: Path, data: DataConfig, outputs: Sequence[str]) -> None:
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.transform = eval_transform(data)
        self.pixels_key = pixels_key(self.transform)
        self.outputs = list(outputs)
        self.key = ("onnx", str(path))

    def run(self, pixels: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(pixels.numpy())
        return torch.from_numpy(np.concatenate(self.session.run(self.outputs, {INPUT: x}), 1))

    def outputs_of(self, batch: Batch, rows: Sequence[int]) -> torch.Tensor:
        """All the graph's outputs for the rows, each image run once per batch."""
        return batch.inputs(self.key, rows, lambda missing: self.run(batch.per_image(
            self.pixels_key, self.transform, missing)))  # fmt: skip


@dataclass
class OnnxNode:
    """A node's child probabilities: its columns of its graph's outputs."""

    classes: list[str]
    graph: OnnxGraph
    columns: slice

    def probs(self, batch: Batch, rows: Sequence[int]) -> torch.Tensor:
        return self.graph.outputs_of(batch, rows)[:, self.columns]

    def per_image(self) -> dict[Hashable, Callable]:
        return {self.graph.pixels_key: self.graph.transform}


def read_manifest(folder: str | Path) -> dict:
    """The manifest of an exported folder, with every file it lists checked against its sha256."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        read_tree(folder)  # says what is wrong when the folder is missing or not a model folder at all
        raise ArtefactError(f"'{folder}' is not an ONNX export (no {MANIFEST}); make one with `lcpn export`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest["format"] != FORMAT or manifest["format_version"] > FORMAT_VERSION:
            raise ValueError(f"format {manifest['format']} {manifest['format_version']}")
        files = dict(manifest["files"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtefactError(f"'{path}' is not a manifest this lcpn can read ({exc})") from None
    for name, sha256 in files.items():
        if not (folder / name).is_file():
            raise ArtefactError(f"'{folder / name}' is missing; export the models again")
        if fsio.file_sha256(folder / name) != sha256:
            raise ArtefactError(
                f"'{folder / name}' is not the file that was exported (its sha256 differs from {MANIFEST}'s); "
                "export the models again"
            )
    return manifest


def load_onnx_models(folder: str | Path) -> LoadedModels:
    """The tree, every parent node's model and every exported attribute's, from an exported folder
    (``Cascade.of(load_onnx_models(folder))``); raises ArtefactError."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    tree = read_tree(folder)
    specs = read_specs(folder)  # the copy of the models' hierarchy.json names each attribute's values
    exported = manifest.get("attributes", {})  # exports made before attributes were exported have none
    if unknown := [name for name in exported if name not in specs]:
        raise ArtefactError(f"'{folder / MANIFEST}' lists attributes that hierarchy.json does not: {unknown}")
    described = {**manifest["nodes"], **{specs[name].node: d for name, d in exported.items()}}
    models: dict[str, NodeModel] = {n: ConstantNode(d["classes"]) for n, d in described.items() if d.get("constant")}
    by_output = {d["output"]: (n, d) for n, d in described.items() if not d.get("constant")}
    for file, model in manifest["models"].items():
        graph = OnnxGraph(folder / file, DataConfig.from_dict(model["data"]), model["outputs"])
        start = 0
        for output in model["outputs"]:
            node, d = by_output[output]
            models[node] = OnnxNode(d["classes"], graph, slice(start, start + len(d["classes"])))
            start += len(d["classes"])
    attributes = {name: AttributeModel(specs[name], models[specs[name].node]) for name in exported}
    priors = {node: d["prior"] for node, d in manifest["nodes"].items() if "prior" in d}  # older exports: none
    return LoadedModels(tree, {node: models[node] for node in manifest["nodes"]}, attributes, priors)
