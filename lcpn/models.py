"""Loading a model folder for inference: every node model and the shared backbone, checked once.

``load_models`` reads ``hierarchy.json``, loads each parent node's model (weights included) and
checks that it fits the tree, so that routing never meets a broken node halfway through a batch.
``node_problems`` runs the same checks node by node and collects what is wrong instead of stopping.
``load_all`` also loads the attribute models listed in ``hierarchy.json`` (``attributes``), on the
same shared backbone, so a features-mode attribute head reads the embedding the nodes' heads read.

Node models answer one question: the child probabilities of some rows of a ``Batch``. A batch
computes each per-image input (pixels for one transform, the shared backbone's embedding) once.

Precision: ``as-trained`` (the default) runs every network as it was trained: the shared backbone
in the precision recorded in ``backbone/node.json``, a fine-tuned node in its own recorded
precision, else float32. ``auto``, ``bf16`` and ``fp32`` override that for every network.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from . import artefacts, backbones
from .artefacts import ArtefactError, NodeInfo
from .attributes import AttributeSpec, read_specs
from .colour import ColourHistogram
from .devices import resolve_device, want_bf16
from .hierarchy import Hierarchy, names_of
from .runtime import Runtime, SharedBackbone, pixels_key, recorded_precision

AS_TRAINED = "as-trained"
PRECISIONS = (AS_TRAINED, "auto", "bf16", "fp32")
BACKBONE_FOLDER = "backbone"


class Batch:
    """The rows of one batch and their per-image inputs, each computed once and cached by key.

    Per-image inputs (a transform's pixels) come prepared by the input pipeline (``prepared``:
    per key, the rows' values, one stacked tensor for pixels), or are computed here from ``images``
    (decoded pictures, as the server hands them over). Values derived from them (embeddings) are
    cached per row with ``inputs``.
    """

    def __init__(self, images: Sequence[Any] = (), prepared: Mapping[Hashable, Any] | None = None) -> None:
        self.images = list(images)
        self.prepared = dict(prepared or {})
        self.size = len(next(iter(self.prepared.values()))) if self.prepared else len(self.images)
        self._cache: dict[Any, dict[int, torch.Tensor]] = defaultdict(dict)

    def inputs(self, key: Any, rows: Sequence[int], compute: Callable[[list[int]], Sequence[torch.Tensor]]
               ) -> torch.Tensor:  # fmt: skip
        """The rows' values of ``key``, stacked; ``compute`` gets the rows not yet cached."""
        cache = self._cache[key]
        missing = [r for r in rows if r not in cache]
        if missing:
            for r, value in zip(missing, compute(missing)):
                cache[r] = value
        return torch.stack([cache[r] for r in rows])

    def per_image(self, key: Hashable, fn: Callable[[Any], torch.Tensor], rows: Sequence[int]) -> torch.Tensor:
        """``fn`` of the rows' pictures, stacked: as the input pipeline prepared it, else computed here."""
        if key not in self.prepared:
            return self.inputs(key, rows, lambda missing: [fn(self.images[r]) for r in missing])
        values = self.prepared[key]
        return values if list(rows) == list(range(self.size)) else values[list(rows)]


class NodeModel(Protocol):
    classes: list[str]

    def probs(self, batch: Batch, rows: Sequence[int]) -> torch.Tensor:
        """Child probabilities, shape (len(rows), len(classes))."""

    def per_image(self) -> dict[Hashable, Callable]:
        """The per-image inputs ``probs`` reads from a batch, by key: picklable functions of a picture."""


@dataclass
class ConstantNode:
    classes: list[str]

    def probs(self, batch: Batch, rows: Sequence[int]) -> torch.Tensor:
        return torch.ones(len(rows), 1)

    def per_image(self) -> dict[Hashable, Callable]:
        return {}


@dataclass
class NetworkNode:
    """A fine-tuned network per node, on its own eval transform."""

    classes: list[str]
    network: torch.nn.Module
    transform: Callable
    runtime: Runtime

    def __post_init__(self) -> None:
        # Nodes share pixels only when their transforms are the same, whatever their data configs say.
        self.pixels_key = pixels_key(self.transform)

    def per_image(self) -> dict[Hashable, Callable]:
        return {self.pixels_key: self.transform}

    def probs(self, batch: Batch, rows: Sequence[int]) -> torch.Tensor:
        x = batch.per_image(self.pixels_key, self.transform, rows)
        return self.runtime.run(self.network, x).softmax(1).cpu()


@dataclass
class HeadNode:
    classes: list[str]
    head: torch.nn.Module
    backbone: SharedBackbone

    def per_image(self) -> dict[Hashable, Callable]:
        return self.backbone.per_image()

    def probs(self, batch: Batch, rows: Sequence[int]) -> torch.Tensor:
        # The root asks for every image first, so the whole batch is embedded in one pass.
        probs = self._probs(batch, rows, self.backbone.transform)
        if self.backbone.test_flips:
            probs = (probs + self._probs(batch, rows, self.backbone.mirrored)) / 2
        return probs

    def _probs(self, batch: Batch, rows: Sequence[int], transform: Callable) -> torch.Tensor:
        key = pixels_key(transform)
        feats = batch.inputs(("features", key), rows, lambda missing: self.backbone.embed(
            batch.per_image(key, transform, missing)))  # fmt: skip
        with torch.inference_mode():
            return self.head(feats).float().softmax(1)


@dataclass
class AttributeModel:
    """An attribute's classifier: a node model whose classes are the attribute's values."""

    spec: AttributeSpec
    model: NodeModel

    def probs(self, batch: Batch, rows: Sequence[int]) -> torch.Tensor:
        return self.model.probs(batch, rows)

    def per_image(self) -> dict[Hashable, Callable]:
        return self.model.per_image()


@dataclass
class LoadedModels:
    tree: Hierarchy
    nodes: dict[str, NodeModel]  # by node id
    attributes: dict[str, AttributeModel]  # by attribute name, in the order of hierarchy.json
    priors: dict[str, list[float]] = field(default_factory=dict)  # by node id, see class_prior


def class_prior(info: NodeInfo) -> list[float] | None:
    """The class mix a logistic-regression head expects (its mean probability on its training images,
    ``metrics.prior``), which ``--adapt-priors`` starts from; None for the other models.

    Only a logistic regression's probabilities are calibrated to its training mix: the MLPs of mlp and
    ensemble heads and fine-tuned networks are trained with class weights, and EM on their
    probabilities collapsed on the catalogue (a 7-image class took 30% of the OOD set; docs/benchmarks.md).
    """
    prior = (info.metrics or {}).get("prior")
    calibrated = info.mode == "features" and info.head.get("type") == "linear"
    return [float(p) for p in prior] if calibrated and prior and len(prior) == len(info.classes) else None


def read_tree(models: str | Path) -> Hierarchy:
    """The tree of a model folder (``hierarchy.json``)."""
    models = Path(models)
    if not models.is_dir():
        raise ArtefactError(f"the model folder '{models}' does not exist")
    if not (models / "hierarchy.json").is_file():
        raise ArtefactError(f"'{models}' is not an lcpn model folder (no hierarchy.json)")
    try:
        return Hierarchy.load(models / "hierarchy.json")
    except (ValueError, KeyError) as exc:
        raise ArtefactError(f"'{models / 'hierarchy.json'}' is not a valid tree ({exc})") from None


def check_fits(tree: Hierarchy, node: str, classes: Sequence[str]) -> None:
    """A node model must know exactly the node's children, in the tree's order."""
    expected = [names_of(c)[-1] for c in tree.children[node]]
    if list(classes) != expected:
        raise ArtefactError(f"the model of node '{node or 'root'}' knows {list(classes)}, but the tree has {expected}")


def load_models(
    models: str | Path, device: str = "auto", precision: str = AS_TRAINED
) -> tuple[Hierarchy, dict[str, NodeModel]]:
    """The tree and every parent node's model, loaded and checked; raises ArtefactError."""
    loaded = load_all(models, device, precision, attributes=False)
    return loaded.tree, loaded.nodes


def load_all(models: str | Path, device: str = "auto", precision: str = AS_TRAINED, attributes: bool = True
             ) -> LoadedModels:  # fmt: skip
    """Every parent node's model and, with ``attributes``, every attribute model; raises ArtefactError."""
    tree = read_tree(models)
    specs = read_specs(models) if attributes else {}
    loader = _Loader(Path(models), tree, device, precision, _folders(tree, specs.values()))
    nodes = {node: loader.node(node) for node in loader.tree.parents}
    return LoadedModels(loader.tree, nodes, {name: loader.attribute(spec) for name, spec in specs.items()},
                        loader.priors)  # fmt: skip


def _folders(tree: Hierarchy, specs: Iterable[AttributeSpec]) -> list[str]:
    """The model folders of every parent node and of the given attributes."""
    return [tree.folders[n] for n in tree.parents] + [s.folder for s in specs]


def node_problems(models: str | Path) -> dict[str, str]:
    """What keeps each parent node (by node id) or attribute (``attribute:<name>``) from loading on the CPU."""
    tree, specs = read_tree(models), list(read_specs(models).values())
    loader = _Loader(Path(models), tree, "cpu", "fp32", _folders(tree, specs))
    checks = [(n, partial(loader.node, n)) for n in tree.parents]
    checks += [(s.node, partial(loader.attribute, s)) for s in specs]
    problems = {}
    for name, check in checks:
        try:
            check()
        except ArtefactError as exc:
            problems[name] = str(exc)
    return problems


class _Loader:
    """Loads nodes one at a time; the shared backbone once, on the first features node.

    ``heads``: the folders of every model that will be loaded; the backbone computes the colour
    histogram only when one of them reads it (predicting the category path alone skips it).
    """

    def __init__(self, models: Path, tree: Hierarchy, device: str, precision: str, heads: Sequence[str]) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision '{precision}'; choose {', '.join(PRECISIONS)}")
        self.models, self.tree, self.precision = models, tree, precision
        # An unreadable node.json counts as no colour here: loading that node will say what is wrong.
        infos = [artefacts.features_head_info(models / folder) for folder in heads]
        self.colour_read = any(info is not None and artefacts.reads_colour(info) for info in infos)
        self.device = resolve_device(device)
        self._backbone: SharedBackbone | None = None
        self.priors: dict[str, list[float]] = {}  # of the nodes loaded so far

    def runtime(self, info: NodeInfo) -> Runtime:
        chosen = recorded_precision(info.config) if self.precision == AS_TRAINED else self.precision
        return Runtime(self.device, want_bf16(chosen, self.device))

    def node(self, node: str) -> NodeModel:
        loaded = artefacts.load_node(self.models / self.tree.folders[node])
        check_fits(self.tree, node, loaded.info.classes)
        if (prior := class_prior(loaded.info)) is not None:
            self.priors[node] = prior
        return self._model(loaded, f"node '{node or 'root'}'")

    def attribute(self, spec: AttributeSpec) -> AttributeModel:
        loaded = artefacts.load_node(self.models / spec.folder)
        if loaded.info.classes != list(spec.values):
            raise ArtefactError(f"the model of attribute '{spec.name}' knows {loaded.info.classes}, but "
                                f"{self.models / 'hierarchy.json'} lists {list(spec.values)}")  # fmt: skip
        return AttributeModel(spec, self._model(loaded, f"attribute '{spec.name}'"))

    def _model(self, loaded: artefacts.LoadedNode, title: str) -> NodeModel:
        info = loaded.info
        if info.kind == "constant":
            return ConstantNode(info.classes)
        if info.mode == "features":
            backbone = self.backbone()
            head = loaded.network.to("cpu")
            colour = backbone.embedder.colour
            skip = colour.dim if colour is not None and not artefacts.reads_colour(info) else 0
            _check_head_fits(title, info, backbone, skip, self.models)
            return HeadNode(info.classes, nn.Sequential(backbones.SkipColumns(skip), head) if skip else head, backbone)
        network = loaded.network.to(self.device, memory_format=torch.channels_last)
        return NetworkNode(info.classes, network, loaded.transforms, self.runtime(info))

    def backbone(self) -> SharedBackbone:
        """The frozen backbone stored once in ``<models>/backbone/`` for features-mode heads."""
        if self._backbone is None:
            folder = self.models / BACKBONE_FOLDER
            info = artefacts.read_info(folder)
            network = backbones.build(info.backbone, 0)
            artefacts.load_weights(network, folder / artefacts.MODEL)
            data = artefacts.data_config(info)
            colour = ColourHistogram(data.mean, data.std) if artefacts.reads_colour(info) and self.colour_read else None
            # Model folders from before stage features have no "stage_features": their heads read the final features.
            embedder = backbones.Embedder(network, int(info.config.get("stage_features", 0)), colour)
            embedder.eval().to(self.device, memory_format=torch.channels_last)
            flips = bool(info.config.get("test_flips", False))  # folders from before test flips have none
            self._backbone = SharedBackbone(info.backbone, embedder, data, self.runtime(info), flips)
        return self._backbone


def _check_head_fits(title: str, info: NodeInfo, shared: SharedBackbone, skip: int, models: Path) -> None:
    """A head trained on another embedding (``lcpn train --node`` with other options) must not load.

    ``skip``: the backbone's leading colour columns that this head does not read."""
    trained_on = (info.backbone, artefacts.data_config(info).image_size, artefacts.head_in_features(info))
    given = (shared.name, shared.data.image_size, shared.embedder.dim - skip)
    if trained_on != given:
        raise ArtefactError(
            f"the head of {title} was trained on {_describe(*trained_on)} embeddings, but "
            f"{models / BACKBONE_FOLDER} gives {_describe(*given)} ones; retrain that node with the others' options"
        )


def _describe(backbone: str, size: int, dim: int) -> str:
    return f"{backbone} {size} px {dim}-feature"
