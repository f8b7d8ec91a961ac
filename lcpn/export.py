"""``lcpn export``: a model folder as ONNX files that any ONNX runtime can serve, described by a manifest.

Features-mode nodes become one graph, ``lcpn.onnx``: the shared backbone once, then every node's
head, with one output per node (named ``/`` + node id: ``/`` is the root, ``/bags`` the node
``bags``) holding its child probabilities. With test flips the graph embeds each picture and its
mirror in one batch and averages the heads' probabilities, as ``models.HeadNode`` does. Other
heads that read the same embedding (attribute heads) are more named outputs of the same graph.
A fine-tuned node is a whole network: one file per node under ``nodes/``.

Every graph takes ``image``: a float32 NCHW batch made by ``transforms.eval_transform`` from the
data config the manifest gives for that file (size, mean, std, and how a picture becomes a
square). Beside the files: the model folder's ``hierarchy.json`` and ``manifest.json`` (the files
with their sha256, each node's classes and output, the lcpn version), which ``onnx_runtime``
checks before it serves anything.

``--quantize int8`` is static QDQ quantisation of the backbone (per-channel weights, activations
calibrated with min/max on train images of the models' own split); the pooled embedding, its
standardisation and the heads, a small share of the work, stay float32. Two settings decide its
accuracy on EfficientNet: every backbone operator is quantised, so ReLU6 folds into its
convolution's output range (quantising the convolutions alone spends most of the 256 levels on
negative values that ReLU6 then clips); and weights keep 7 bits, because CPUs without VNNI (AVX2)
multiply uint8 by int8 in 16-bit sums that saturate with 8-bit weights (onnxruntime's
``reduce_range``). docs/benchmarks.md has what it keeps of float32's paths.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__, artefacts, fsio
from .errors import LcpnError
from .feed import collect_images
from .images import ImageError, open_rgb
from .models import ConstantNode, HeadNode, LoadedModels, NetworkNode, NodeModel, load_all
from .transforms import DataConfig, eval_transform

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
HIERARCHY = "hierarchy.json"
FEATURES_GRAPH = "lcpn.onnx"
INPUT = "image"
FORMAT = "lcpn-onnx"
FORMAT_VERSION = 1
DEFAULT_OPSET = 17
OPSETS = (13, 20)  # the range torch's ONNX exporter writes and onnxruntime runs
QUANTIZE = ("int8",)
CALIBRATION_IMAGES = 64  # enough for stable min/max ranges; onnxruntime holds every activation of each (~100 MB)


class ExportError(LcpnError):
    """A model folder that cannot be exported as asked."""


def output_name(node: str) -> str:
    """The graph output that holds a node's child probabilities: ``/`` then the node id."""
    return "/" + node


@dataclass
class Graph:
    """One ONNX file to write: a module from ``image`` to the named outputs, and its input's data config."""

    file: str
    module: nn.Module
    data: DataConfig
    outputs: list[str] = field(default_factory=list)
    backbone: str = ""  # the ONNX node-name prefix of the convolutional part, the part int8 quantises


class FeaturesGraph(nn.Module):
    """The shared backbone and every head on its embedding: ``image`` -> each head's probabilities."""

    def __init__(self, embedder: nn.Module, heads: Sequence[nn.Module], test_flips: bool) -> None:
        super().__init__()
        self.embedder, self.heads, self.test_flips = embedder, nn.ModuleList(heads), test_flips

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.test_flips:  # the mirror images ride in the same batch: one backbone call
            image = torch.cat([image, image.flip(3)])
        features = self.embedder(image)
        outputs = []
        for head in self.heads:
            # softmax also for ProbabilityAverage mixtures: they return log-probabilities.
            probs = head(features).float().softmax(1)
            if self.test_flips:
                probs = probs.reshape(2, -1, probs.shape[1]).mean(0)
            outputs.append(probs)
        return tuple(outputs)


def graphs(models: Path, folders: dict[str, str], nodes: dict[str, NodeModel]) -> list[Graph]:
    """What to write: one graph for the features-mode heads, one per fine-tuned node (or attribute);
    ``nodes`` and ``folders`` by node id (an attribute's is ``attribute:<name>``)."""
    heads = {node: m for node, m in nodes.items() if isinstance(m, HeadNode)}
    out = []
    if heads:
        backbone = next(iter(heads.values())).backbone
        module = FeaturesGraph(backbone.embedder, [m.head for m in heads.values()], backbone.test_flips)
        out.append(Graph(FEATURES_GRAPH, module, backbone.data, [output_name(n) for n in heads], "/embedder/"))
    for node, m in nodes.items():
        if isinstance(m, NetworkNode):
            data = artefacts.data_config(artefacts.read_info(models / folders[node]))
            module = nn.Sequential(m.network, nn.Softmax(1))
            out.append(Graph(f"nodes/{folders[node]}.onnx", module, data, [output_name(node)], "/0/"))
    return out


def export(
    models: str | Path, out: str | Path, quantize: str | None = None, opset: int = DEFAULT_OPSET,
    calibration: str | Path | None = None, calibration_images: int = CALIBRATION_IMAGES,
) -> dict:  # fmt: skip
    """Write ``models`` as ONNX into ``out`` (replaced whole once complete); return the manifest.

    ``calibration``: for ``quantize="int8"``, a prepared split (its train images) or a folder of
    images, of which ``calibration_images`` spread over it are used; by default the models' own split.
    """
    models, out = Path(models), Path(out)
    if quantize not in (None, *QUANTIZE):
        raise ExportError(f"unknown quantisation '{quantize}'; choose {', '.join(QUANTIZE)}")
    if not OPSETS[0] <= opset <= OPSETS[1]:
        raise ExportError(f"opset {opset} cannot be written; choose one from {OPSETS[0]} to {OPSETS[1]}")
    if out.resolve() == models.resolve():
        raise ExportError("--out must be another folder than --models")
    loaded = load_all(models, "cpu", "fp32")
    attributes = {a.spec.node: a.model for a in loaded.attributes.values()}  # heads like the nodes'
    folders = {**loaded.tree.folders, **{a.spec.node: a.spec.folder for a in loaded.attributes.values()}}
    to_write = graphs(models, folders, {**loaded.nodes, **attributes})
    images = calibration_set(models, calibration, calibration_images) if quantize else []
    with fsio.replaced_folder(out) as tmp:
        for graph in to_write:
            path = tmp / graph.file
            path.parent.mkdir(parents=True, exist_ok=True)
            write_onnx(graph, path, opset)
            if quantize:
                quantize_int8(path, graph, images)
        shutil.copyfile(models / HIERARCHY, tmp / HIERARCHY)
        manifest = make_manifest(tmp, loaded, to_write, quantize, opset)
        fsio.write_json(tmp / MANIFEST, manifest)
    return manifest


def write_onnx(graph: Graph, path: Path, opset: int) -> None:
    module = graph.module.eval().float().to(memory_format=torch.contiguous_format)
    for network in module.modules():
        # efficientnet-pytorch's memory-efficient swish is a custom autograd op that cannot be exported, and
        # set_swish(memory_efficient=False) swaps in the plain one; Lite networks hold ReLU6 there, which
        # set_swish would replace by swish, so only networks that hold the memory-efficient one are switched.
        if type(getattr(network, "_swish", None)).__name__ == "MemoryEfficientSwish":
            network.set_swish(memory_efficient=False)
    size = graph.data.image_size
    batch = {0: "batch"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on constant folding and its own deprecation
        torch.onnx.export(
            module, (torch.rand(2, 3, size, size),), str(path), input_names=[INPUT], output_names=graph.outputs,
            dynamic_axes={name: batch for name in [INPUT, *graph.outputs]}, opset_version=opset, dynamo=False,
        )  # fmt: skip


def make_manifest(folder: Path, loaded: LoadedModels, written: list[Graph], quantize: str | None, opset: int) -> dict:
    """Nodes by node id (with the class mix each expects), attributes by name (their outputs are named
    after their node ids)."""
    file_of = {output: g.file for g in written for output in g.outputs}

    def describe(node: str, m: NodeModel) -> dict:
        if isinstance(m, ConstantNode):
            return {"classes": list(m.classes), "constant": True}
        return {"classes": list(m.classes), "file": file_of[output_name(node)], "output": output_name(node)}

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lcpn_version": __version__,
        "opset": opset,
        "quantize": quantize,
        "input": INPUT,
        "input_layout": "float32 NCHW RGB: squared and resized per data.square, /255, then (x - mean) / std",
        "files": {name: fsio.file_sha256(folder / name) for name in [HIERARCHY, *(g.file for g in written)]},
        "models": {g.file: {"data": g.data.to_dict(), "outputs": g.outputs} for g in written},
        "nodes": {
            node: describe(node, m) | ({"prior": loaded.priors[node]} if node in loaded.priors else {})
            for node, m in loaded.nodes.items()
        },  # fmt: skip
        "attributes": {name: describe(a.spec.node, a.model) for name, a in loaded.attributes.items()},
    }


def calibration_set(models: Path, source: str | Path | None, count: int) -> list[str]:
    """Up to ``count`` images spread over ``source``: a prepared split's train images (by default the
    split ``models`` were trained on; images.csv is sorted by leaf, so every leaf is drawn) or a folder's."""
    if source is None:
        try:
            source = json.loads((models / HIERARCHY).read_text(encoding="utf-8"))["split"]
        except (OSError, KeyError, ValueError):
            source = None
        if source is None or not (Path(source) / "images.csv").is_file():
            raise ExportError(
                f"int8 needs calibration images and the split that '{models}' was trained on is not there; "
                "pass --calibration with a prepared split or a folder of your images"
            )
    source = Path(source)
    if (source / "images.csv").is_file():
        images = [r["path"] for r in fsio.read_csv(source / "images.csv") if r["split"] == "train"]
    else:
        images = collect_images([source])
    return images[:: max(1, len(images) // count)][:count]


class _Calibration:
    """onnxruntime's CalibrationDataReader over image files, a few images at a time."""

    def __init__(self, images: Sequence[str | Path], data: DataConfig, batch: int = 8) -> None:
        self._batches = self._read(images, eval_transform(data), batch)

    @staticmethod
    def _read(images: Sequence[str | Path], transform, batch: int) -> Iterator[dict[str, np.ndarray]]:
        pixels = []
        for image in images:
            try:
                pixels.append(transform(open_rgb(image)).numpy())
            except ImageError as exc:
                log.warning("calibration image %s left out: %s", image, exc)
            if len(pixels) == batch:
                yield {INPUT: np.stack(pixels)}
                pixels = []
        if pixels:
            yield {INPUT: np.stack(pixels)}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


class _Without(logging.Filter):
    """Drops the log records that contain ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quantize_int8(path: Path, graph: Graph, images: Sequence[str | Path]) -> None:
    """Replace the ONNX file at ``path`` by its static int8 quantisation: QDQ backbone, float32 heads."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not images:
        raise ExportError("int8 needs calibration images and none were given; pass --calibration DIR with some")
    prepared = path.with_suffix(".prepared.onnx")
    quant_pre_process(str(path), str(prepared))
    # A classifier stays float, and so does the colour histogram: int8 steps of 1/256 would blur the
    # shares of a few pixels it tells colours apart by.
    backbone = [
        node.name for node in onnx.load(str(prepared), load_external_data=False).graph.node
        if node.name.startswith(graph.backbone) and not node.name.startswith(f"{graph.backbone}colour/")
        and node.op_type not in ("Gemm", "MatMul")
    ]  # fmt: skip
    quiet = _Without("exceeds the range of a int32")  # the biases of dead channels, whose weights are ~0
    logging.getLogger().addFilter(quiet)
    try:
        quantize_static(
            str(prepared), str(path), _Calibration(images, graph.data), quant_format=QuantFormat.QDQ,
            nodes_to_quantize=backbone, per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
        )  # fmt: skip
    finally:
        logging.getLogger().removeFilter(quiet)
    prepared.unlink()
