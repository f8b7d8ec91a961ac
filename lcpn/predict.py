"""``Cascade``: every node model loaded once, batched top-down routing, top-k paths.

Routing works on a batch of images at a time. Each round asks, for every image, which node it
needs next; the requests are grouped by node and every node model runs once per round on its
group. Probabilities are cached per (image, node), so the greedy path, the best path, the top-k
alternatives and the evaluation's per-node checks never run a model twice on the same image.

Decoding:
- ``best-path`` (the default) picks the full path with the highest product of probabilities; on
  the catalogue benchmark it beats greedy routing in every head setting tried (docs/benchmarks.md);
- ``greedy`` follows the most probable child at each level (the classic LCPN behaviour).
Top-k paths come from an exact best-first search: a path's probability can only shrink as it goes
deeper, so the first k leaves taken off a priority queue of partial paths are the k best paths.
``min_confidence`` cuts the decoded path at the first level below the root whose probability is
below the threshold (``stopped_early``); the root's decision is always kept.
"""

from __future__ import annotations

import heapq
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from . import artefacts, backbones
from .artefacts import ArtefactError
from .devices import resolve_device, want_bf16
from .hierarchy import ROOT, Hierarchy, names_of
from .images import ImageError, open_rgb
from .runtime import Runtime, SharedBackbone
from .transforms import DataConfig

log = logging.getLogger(__name__)

DECODERS = ("best-path", "greedy")
DEFAULT_DECODE = "best-path"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class Batch:
    """The images of one batch, with per-image inputs computed once and cached by key."""

    def __init__(self, images: Sequence[Any]) -> None:
        self.images = list(images)
        self._cache: dict[Any, dict[int, torch.Tensor]] = defaultdict(dict)

    def inputs(self, key: Any, rows: Sequence[int], compute: Callable[[list[Any]], torch.Tensor]) -> torch.Tensor:
        cache = self._cache[key]
        missing = [r for r in rows if r not in cache]
        if missing:
            for r, value in zip(missing, compute([self.images[r] for r in missing])):
                cache[r] = value
        return torch.stack([cache[r] for r in rows])


class NodeModel(Protocol):
    classes: list[str]

    def probs(self, batch: Batch, rows: Sequence[int]) -> torch.Tensor:
        """Child probabilities, shape (len(rows), len(classes))."""


@dataclass
class ConstantNode:
    classes: list[str]

    def probs(self, batch: Batch, rows: Sequence[int]) -> torch.Tensor:
        return torch.ones(len(rows), 1)


@dataclass
class NetworkNode:
    """A fine-tuned network per node, on its own eval transform (cached per data config)."""

    classes: list[str]
    network: torch.nn.Module
    data: DataConfig
    transform: Callable
    runtime: Runtime

    def probs(self, batch: Batch, rows: Sequence[int]) -> torch.Tensor:
        x = batch.inputs(("pixels", self.data), rows, lambda ims: torch.stack([self.transform(im) for im in ims]))
        return self.runtime.run(self.network, x).softmax(1).cpu()


@dataclass
class HeadNode:
    classes: list[str]
    head: torch.nn.Module
    backbone: SharedBackbone

    def probs(self, batch: Batch, rows: Sequence[int]) -> torch.Tensor:
        # The root asks for every image first, so the whole batch is embedded in one pass.
        feats = batch.inputs("features", rows, self.backbone.embed)
        with torch.inference_mode():
            return self.head(feats).float().softmax(1)


@dataclass
class Prediction:
    image: str
    path: list[str] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    path_probability: float = 0.0
    top_k: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    error: str | None = None

    @property
    def node(self) -> str:
        """The predicted node id ('' when nothing was predicted)."""
        return "/".join(self.path)

    def to_dict(self) -> dict:
        return {
            "image": self.image, "path": self.path, "confidences": [round(c, 6) for c in self.confidences],
            "path_probability": round(self.path_probability, 6),
            "top_k": [{"path": t["path"], "probability": round(t["probability"], 6)} for t in self.top_k],
            "stopped_early": self.stopped_early, "error": self.error,
        }  # fmt: skip


class Cascade:
    """Top-down LCPN prediction over a tree of node models."""

    def __init__(self, tree: Hierarchy, nodes: dict[str, NodeModel]) -> None:
        missing = [n or "root" for n in tree.parents if n not in nodes]
        if missing:
            raise ArtefactError(f"no model for node(s) {', '.join(missing)}; run `lcpn train` for them")
        for node in tree.parents:
            expected = [names_of(c)[-1] for c in tree.children[node]]
            if list(nodes[node].classes) != expected:
                raise ArtefactError(f"the model of node '{node or 'root'}' knows {nodes[node].classes}, "
                                    f"but the tree has {expected}")  # fmt: skip
        self.tree, self.nodes = tree, nodes

    # --- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, models: str | Path, device: str = "auto", precision: str = "fp32") -> Cascade:
        """Load ``hierarchy.json`` and every node of a model folder once (precision: auto, bf16, fp32)."""
        models = Path(models)
        if not models.is_dir():
            raise ArtefactError(f"the model folder '{models}' does not exist")
        if not (models / "hierarchy.json").is_file():
            raise ArtefactError(f"'{models}' is not an lcpn model folder (no hierarchy.json)")
        try:
            tree = Hierarchy.load(models / "hierarchy.json")
        except (ValueError, KeyError) as exc:
            raise ArtefactError(f"'{models / 'hierarchy.json'}' is not a valid tree ({exc})") from None
        resolved = resolve_device(device)
        runtime = Runtime(resolved, want_bf16(precision, resolved))
        shared: SharedBackbone | None = None
        nodes: dict[str, NodeModel] = {}
        for node in tree.parents:
            loaded = artefacts.load_node(models / tree.folders[node])
            info = loaded.info
            if info.kind == "constant":
                nodes[node] = ConstantNode(info.classes)
            elif info.mode == "features":
                shared = shared or load_shared_backbone(models, runtime)
                _check_head_fits(node, info, shared, models)
                nodes[node] = HeadNode(info.classes, loaded.network.to("cpu"), shared)
            else:
                network = loaded.network.to(runtime.device, memory_format=torch.channels_last)
                nodes[node] = NetworkNode(info.classes, network, artefacts.data_config(info), loaded.transforms,
                                          runtime)  # fmt: skip
        return cls(tree, nodes)

    # --- routing ---------------------------------------------------------------------------------
    def node_probabilities(self, batch: Batch, probs: dict, requests: Iterable[tuple[int, str]]) -> None:
        """Fill ``probs[(row, node)]`` for the requests not yet known, one model call per node.

        Routing and evaluation share it, so no model runs twice on the same image."""
        by_node: dict[str, list[int]] = defaultdict(list)
        for row, node in requests:
            if (row, node) not in probs and row not in by_node[node]:
                by_node[node].append(row)
        for node, rows in by_node.items():
            if rows:
                for row, p in zip(rows, self.nodes[node].probs(batch, rows)):
                    probs[(row, node)] = p

    def _greedy(self, batch: Batch, probs: dict, rows: list[int]) -> dict[int, list[tuple[str, float]]]:
        paths: dict[int, list[tuple[str, float]]] = {r: [] for r in rows}
        frontier = {r: ROOT for r in rows}
        while frontier:
            self.node_probabilities(batch, probs, frontier.items())
            nxt = {}
            for r, node in frontier.items():
                p = probs[(r, node)]
                i = int(p.argmax())
                child = self.tree.children[node][i]
                paths[r].append((child, float(p[i])))
                if not self.tree.is_leaf(child):
                    nxt[r] = child
            frontier = nxt
        return paths

    def _best_first(self, batch: Batch, probs: dict, rows: list[int], k: int) -> dict[int, list[tuple]]:
        """The k most probable full paths per image, exactly, by best-first search in batched rounds."""
        heaps = {r: [(-1.0, ROOT, ())] for r in rows}
        found: dict[int, list[tuple]] = {r: [] for r in rows}
        while True:
            requests = []
            for r, heap in heaps.items():
                # Take finished leaves off the top; stop at the first path that needs a model.
                while heap and len(found[r]) < k:
                    neg, node, steps = heap[0]
                    if self.tree.is_leaf(node):
                        heapq.heappop(heap)
                        found[r].append((-neg, steps))
                    elif (r, node) in probs:
                        heapq.heappop(heap)
                        for child, p in zip(self.tree.children[node], probs[(r, node)].tolist()):
                            heapq.heappush(heap, (neg * p, child, (*steps, (child, p))))
                    else:
                        requests.append((r, node))
                        break
            if not requests:
                return found
            self.node_probabilities(batch, probs, requests)

    def predict_batch(
        self, images: Sequence[Any], top_k: int = 1, decode: str = DEFAULT_DECODE, min_confidence: float = 0.0,
        batch: Batch | None = None, probs: dict | None = None,
    ) -> list[Prediction]:  # fmt: skip
        """Predict a batch of decoded images; ``batch``/``probs`` may be passed in to share caches."""
        if decode not in DECODERS:
            raise ValueError(f"unknown decoder '{decode}'; choose {' or '.join(DECODERS)}")
        batch = batch or Batch(images)
        probs = {} if probs is None else probs
        rows = list(range(len(batch.images)))
        if not rows:
            return []
        k = max(1, top_k)
        best = self._best_first(batch, probs, rows, k) if (decode == "best-path" or top_k > 0) else None
        chosen = self._greedy(batch, probs, rows) if decode == "greedy" else {r: list(best[r][0][1]) for r in rows}
        out = []
        for r in rows:
            steps = chosen[r]
            stop = next((i for i, (_, p) in enumerate(steps) if i > 0 and p < min_confidence), len(steps))
            kept = steps[:stop]
            prob = 1.0
            for _, p in kept:
                prob *= p
            alternatives = best[r][:top_k] if best else []
            out.append(Prediction(
                image="", path=[names_of(n)[-1] for n, _ in kept], confidences=[p for _, p in kept],
                path_probability=prob, stopped_early=stop < len(steps),
                top_k=[{"path": [names_of(n)[-1] for n, _ in s], "probability": p} for p, s in alternatives],
            ))  # fmt: skip
        return out

    def predict_paths(
        self, paths: Sequence[str | Path], batch_size: int = 32, top_k: int = 1, decode: str = DEFAULT_DECODE,
        min_confidence: float = 0.0, workers: int | None = None,
        on_batch: Callable[[Batch, dict, list[int], list[Prediction]], None] | None = None,
    ) -> Iterator[Prediction]:  # fmt: skip
        """Predict image files in order; unreadable files get ``error`` and the rest go on.

        Decoding runs in a thread pool one batch ahead of the networks. ``on_batch`` sees each
        batch, its probability cache and predictions (evaluation uses it to reuse the work).
        """
        paths = [str(p) for p in paths]
        chunks = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
        workers = workers or min(4, os.cpu_count() or 1)
        with ThreadPoolExecutor(workers) as pool:
            pending = [pool.map(_open, chunks[0])] if chunks else []
            for i, chunk in enumerate(chunks):
                opened = list(pending.pop())
                if i + 1 < len(chunks):
                    pending.append(pool.map(_open, chunks[i + 1]))
                good = [j for j, o in enumerate(opened) if isinstance(o, Image.Image)]
                batch, probs = Batch([opened[j] for j in good]), {}
                preds = self.predict_batch(batch.images, top_k, decode, min_confidence, batch, probs)
                if on_batch:
                    on_batch(batch, probs, good, preds)
                by_index = dict(zip(good, preds))
                for j, (path, o) in enumerate(zip(chunk, opened)):
                    pred = by_index.get(j) or Prediction(image="", error=str(o))
                    pred.image = path
                    yield pred


def _open(path: str) -> Image.Image | str:
    try:
        return open_rgb(path)
    except ImageError as exc:
        return str(exc)


def _check_head_fits(node: str, info: artefacts.NodeInfo, shared: SharedBackbone, models: Path) -> None:
    """A head trained on another embedding (``lcpn train --node`` with other options) must not load."""
    trained_on = (info.backbone, artefacts.data_config(info).image_size, artefacts.head_in_features(info))
    given = (shared.name, shared.data.image_size, shared.embedder.dim)
    if trained_on != given:
        raise ArtefactError(
            f"the head of node '{node or 'root'}' was trained on {_describe(*trained_on)} embeddings, but "
            f"{models / 'backbone'} gives {_describe(*given)} ones; retrain that node with the others' options"
        )


def _describe(backbone: str, size: int, dim: int) -> str:
    return f"{backbone} {size} px {dim}-feature"


def load_shared_backbone(models: Path, runtime: Runtime) -> SharedBackbone:
    """The frozen backbone stored once in ``<models>/backbone/`` for features-mode heads."""
    folder = models / "backbone"
    info = artefacts.read_info(folder)
    network = backbones.build(info.backbone, 0)
    network.load_state_dict(artefacts.load_state(folder / artefacts.MODEL))
    # Model folders from before stage features have no "stage_features": their heads read the final features.
    embedder = backbones.Embedder(network, int(info.config.get("stage_features", 0)))
    embedder.eval().to(runtime.device, memory_format=torch.channels_last)
    return SharedBackbone(info.backbone, embedder, artefacts.data_config(info), runtime)


def collect_images(inputs: Iterable[str | Path]) -> list[str]:
    """Files given directly, and image files found recursively in folders (sorted, hidden skipped)."""
    out: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*")
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )  # fmt: skip
            out.extend(str(f) for f in found)
        else:
            out.append(str(p))
    return out
