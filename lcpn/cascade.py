"""``Cascade``: batched top-down routing through the node models, and decoding of the paths.

Routing works on a batch of images at a time. Each round asks, for every image, which node it
needs next; the requests are grouped by node and every node model runs once per round on its
group. Probabilities are cached per (image, node), so the greedy path, the best path, the top-k
alternatives and the evaluation's per-node checks never run a model twice on the same image.

Decoding is pure: ``greedy`` and ``best_first`` read child probabilities through a lookup
function and know nothing of networks or images.
- ``best-path`` (the default) picks the full path with the highest product of probabilities; on
  the catalogue benchmark it beats greedy routing in every head setting tried (docs/benchmarks.md);
- ``greedy`` follows the most probable child at each level (the classic LCPN behaviour).
Top-k paths come from an exact best-first search: a path's probability can only shrink as it goes
deeper, so the first k leaves taken off a priority queue of partial paths are the k best paths.
``min_confidence`` cuts the decoded path at the first level below the root whose probability is
below the threshold (``stopped_early``); the root's decision is always kept.

Attribute models (gender, colour, ...) run once per batch on every image beside the routing; in
features mode they read the embedding the root's head already computed for the batch.

``adapt_priors`` corrects for a new class mix (``label_shift``): every node runs on every image
first, each node's mix is re-estimated on the whole input, and only then are the paths decoded.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .artefacts import ArtefactError
from .export import MANIFEST
from .feed import ImageSource, PerImage, feed, source_name
from .hierarchy import ROOT, Hierarchy, names_of
from .label_shift import adapt_tree
from .models import AS_TRAINED, AttributeModel, Batch, LoadedModels, NodeModel, check_fits, load_all

DECODERS = ("best-path", "greedy")
DEFAULT_DECODE = "best-path"

Request = tuple[int, str]  # (row of the batch, parent node id)
Step = tuple[str, float]  # (child node id, its probability)
Scored = tuple[float, list[Step]]  # a full path and its probability
# Child probabilities for each requested (row, node), in the order of the node's children.
Lookup = Callable[[Sequence[Request]], Mapping[Request, Sequence[float]]]


def greedy(tree: Hierarchy, rows: Iterable[int], lookup: Lookup) -> dict[int, list[Step]]:
    """The most probable child at every level, from the root to a leaf, per row."""
    paths: dict[int, list[Step]] = {r: [] for r in rows}
    frontier = {r: ROOT for r in paths}
    while frontier:
        probs = lookup(list(frontier.items()))
        deeper = {}
        for r, node in frontier.items():
            p = probs[(r, node)]
            i = max(range(len(p)), key=p.__getitem__)
            child = tree.children[node][i]
            paths[r].append((child, p[i]))
            if not tree.is_leaf(child):
                deeper[r] = child
        frontier = deeper
    return paths


def best_first(tree: Hierarchy, rows: Iterable[int], lookup: Lookup, k: int) -> dict[int, list[Scored]]:
    """The k most probable full paths per row with their probabilities, exactly, in batched rounds."""
    heaps: dict[int, list] = {r: [(-1.0, ROOT, ())] for r in rows}
    found: dict[int, list[Scored]] = {r: [] for r in heaps}
    known: dict[Request, Sequence[float]] = {}
    while True:
        requests = []
        for r, heap in heaps.items():
            # Take finished leaves off the top; stop at the first path whose node is not looked up yet.
            while heap and len(found[r]) < k:
                neg, node, steps = heap[0]
                if tree.is_leaf(node):
                    heapq.heappop(heap)
                    found[r].append((-neg, list(steps)))
                elif (r, node) in known:
                    heapq.heappop(heap)
                    for child, p in zip(tree.children[node], known[(r, node)]):
                        heapq.heappush(heap, (neg * p, child, (*steps, (child, p))))
                else:
                    requests.append((r, node))
                    break
        if not requests:
            return found
        known.update(lookup(requests))


def _check_decoder(decode: str) -> None:
    if decode not in DECODERS:
        raise ValueError(f"unknown decoder '{decode}'; choose {' or '.join(DECODERS)}")


def cut(steps: Sequence[Step], min_confidence: float) -> tuple[list[Step], bool]:
    """The path up to the first level below the root whose probability is below ``min_confidence``."""
    stop = next((i for i, (_, p) in enumerate(steps) if i > 0 and p < min_confidence), len(steps))
    return list(steps[:stop]), stop < len(steps)


@dataclass
class Prediction:
    image: str
    path: list[str] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    path_probability: float = 0.0
    top_k: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    error: str | None = None
    attributes: dict[str, dict] | None = None  # name -> {label, confidence, top_k}; None without attribute models

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
            **({} if self.attributes is None else {"attributes": self.attributes}),
        }  # fmt: skip


def _names(steps: Sequence[Step]) -> list[str]:
    return [names_of(node)[-1] for node, _ in steps]


class Cascade:
    """Top-down LCPN prediction over a tree of node models."""

    def __init__(
        self, tree: Hierarchy, nodes: Mapping[str, NodeModel], attributes: Mapping[str, AttributeModel] | None = None,
        priors: Mapping[str, Sequence[float]] | None = None,
    ) -> None:  # fmt: skip
        missing = [n or "root" for n in tree.parents if n not in nodes]
        if missing:
            raise ArtefactError(f"no model for node(s) {', '.join(missing)}; run `lcpn train` for them")
        for node in tree.parents:
            check_fits(tree, node, nodes[node].classes)
        self.tree, self.nodes = tree, dict(nodes)
        self.attributes = dict(attributes or {})
        self.priors = dict(priors or {})  # by node id: the class mix each node's model expects
        self.estimated_mix: dict[str, list[float]] = {}  # by node id: the last adapted input's, per class

    @classmethod
    def of(cls, loaded: LoadedModels) -> Cascade:
        return cls(loaded.tree, loaded.nodes, loaded.attributes, loaded.priors)

    @classmethod
    def load(
        cls, models: str | Path, device: str = "auto", precision: str = AS_TRAINED, attributes: bool = True
    ) -> Cascade:
        """Every node (with ``attributes``, every attribute too) of a model folder, loaded once (``load_all``)."""
        return cls.of(load_all(models, device, precision, attributes))

    def node_probabilities(self, batch: Batch, probs: dict[Request, torch.Tensor], requests: Iterable[Request]) -> None:
        """Fill ``probs[(row, node)]`` for the requests not yet known, one model call per node.

        Routing and evaluation share it, so no model runs twice on the same image."""
        by_node: dict[str, list[int]] = defaultdict(list)
        for row, node in requests:
            if (row, node) not in probs and row not in by_node[node]:
                by_node[node].append(row)
        for node, rows in by_node.items():
            for row, p in zip(rows, self.nodes[node].probs(batch, rows)):
                probs[(row, node)] = p

    def predict_batch(
        self, images: Sequence[Any], top_k: int = 1, decode: str = DEFAULT_DECODE, min_confidence: float = 0.0,
        batch: Batch | None = None, probs: dict | None = None,
    ) -> list[Prediction]:  # fmt: skip
        """Predict a batch of decoded images; ``batch``/``probs`` may be passed in to share caches."""
        _check_decoder(decode)
        batch = batch or Batch(images)
        probs = {} if probs is None else probs
        attributes = self.attribute_predictions(batch, list(range(batch.size)), max(1, top_k))
        return self._decode(batch.size, self._lookup(batch, probs), top_k, decode, min_confidence, attributes)

    def greedy_leaves(self, batch: Batch, probs: dict[Request, torch.Tensor], rows: Sequence[int]) -> list[str]:
        """Greedy routing's leaf for each of a batch's ``rows``, from its probability cache (computing
        only the nodes it lacks): a predicted batch decoded the other way without running it again."""
        chosen = greedy(self.tree, rows, self._lookup(batch, probs))
        return [chosen[r][-1][0] for r in rows]

    def _lookup(self, batch: Batch, probs: dict[Request, torch.Tensor]) -> Lookup:
        def lookup(requests: Sequence[Request]) -> dict[Request, list[float]]:
            self.node_probabilities(batch, probs, requests)
            return {req: probs[req].tolist() for req in requests}

        return lookup

    def _decode(
        self, size: int, lookup: Lookup, top_k: int, decode: str, min_confidence: float, attributes: dict[int, dict]
    ) -> list[Prediction]:
        """Predictions for rows ``range(size)`` from their child probabilities and attribute answers."""
        rows = range(size)
        best = best_first(self.tree, rows, lookup, max(1, top_k)) if decode == "best-path" or top_k > 0 else {}
        chosen = greedy(self.tree, rows, lookup) if decode == "greedy" else {r: best[r][0][1] for r in rows}
        out = []
        for r in rows:
            kept, stopped = cut(chosen[r], min_confidence)
            out.append(Prediction(
                image="", path=_names(kept), confidences=[p for _, p in kept],
                path_probability=math.prod(p for _, p in kept), stopped_early=stopped,
                top_k=[{"path": _names(steps), "probability": p} for p, steps in best.get(r, [])[:top_k]],
                attributes=attributes[r] if self.attributes else None,
            ))  # fmt: skip
        return out

    def attribute_predictions(self, batch: Batch, rows: list[int], top_k: int) -> dict[int, dict[str, dict]]:
        """Per row: {attribute: {label, confidence, top_k: [{label, probability}]}}, each model run once."""
        out: dict[int, dict[str, dict]] = {r: {} for r in rows}
        for name, attribute in self.attributes.items() if rows else ():
            values = attribute.model.classes
            probs = attribute.probs(batch, rows)
            top = probs.topk(min(top_k, len(values)), dim=1)
            for r, p, i in zip(rows, top.values.tolist(), top.indices.tolist()):
                ranked = [{"label": values[j], "probability": round(q, 6)} for q, j in zip(p, i)]
                out[r][name] = {"label": ranked[0]["label"], "confidence": ranked[0]["probability"], "top_k": ranked}
        return out

    def per_image(self) -> dict[Hashable, Callable]:
        """Every per-image input that some node or attribute model reads (pixels per distinct transform)."""
        models = [*self.nodes.values(), *self.attributes.values()]
        return {key: fn for model in models for key, fn in model.per_image().items()}

    def predict(
        self, sources: Sequence[ImageSource], batch_size: int = 32, top_k: int = 1, decode: str = DEFAULT_DECODE,
        min_confidence: float = 0.0, workers: int | None = None,
        on_batch: Callable[[Batch, dict, list[int]], None] | None = None,
        extra_inputs: Mapping[Hashable, Callable] | None = None, adapt_priors: bool = False,
    ) -> Iterator[Prediction]:  # fmt: skip
        """Predict image files or bytes in order; a source that is not a usable image gets ``error``.

        The input pipeline (``feed``) decodes and transforms in ``workers`` processes. ``on_batch``
        sees each batch, its probability cache, and the index in ``sources`` of each of its rows
        (evaluation uses it to reuse the work); ``extra_inputs`` are more per-image functions
        (picklable) whose values it finds in ``batch.prepared``. With ``adapt_priors`` nothing is
        yielded before every source has been through every node (``_predict_adapted``).
        """
        prepare = PerImage({**self.per_image(), **(extra_inputs or {})})
        if adapt_priors:
            yield from self._predict_adapted(sources, batch_size, prepare, top_k, decode, min_confidence, workers,
                                             on_batch)  # fmt: skip
            return
        for fed in feed(sources, batch_size, prepare, workers, pin_memory=True):
            batch, probs = Batch(prepared=fed.inputs), {}
            opened = fed.opened
            preds = dict(zip(opened, self.predict_batch((), top_k, decode, min_confidence, batch, probs)))
            if on_batch and opened:
                on_batch(batch, probs, opened)
            for i in fed.indices:
                pred = preds.get(i) or Prediction(image="", error=str(fed.errors[i]))
                pred.image = source_name(sources[i], i)
                yield pred

    def _predict_adapted(
        self, sources: Sequence[ImageSource], batch_size: int, prepare: PerImage, top_k: int, decode: str,
        min_confidence: float, workers: int | None, on_batch: Callable[[Batch, dict, list[int]], None] | None,
    ) -> Iterator[Prediction]:  # fmt: skip
        """Every node on every image, each node's class mix re-estimated on all of them, then the paths."""
        _check_decoder(decode)
        trained = [n for n in self.tree.parents if len(self.nodes[n].classes) > 1]
        if missing := [n or "root" for n in trained if n not in self.priors]:
            raise ArtefactError(
                f"--adapt-priors needs logistic-regression heads (`lcpn train --mode features --head linear`), "
                f"whose probabilities are calibrated to their training mix; node(s) {', '.join(missing)} have "
                "another head, a fine-tuned network or no recorded mix (EM collapses on class-weighted models)"
            )
        fed_batches, answers, table = [], {}, {n: [] for n in trained}
        for fed in feed(sources, batch_size, prepare, workers, pin_memory=True):
            batch, probs, opened = Batch(prepared=fed.inputs), {}, fed.opened
            rows = list(range(len(opened)))
            self.node_probabilities(batch, probs, [(r, n) for r in rows for n in trained])
            for n in trained:
                table[n] += [probs[(r, n)] for r in rows]
            for r, answer in self.attribute_predictions(batch, rows, max(1, top_k)).items():
                answers[opened[r]] = answer
            if on_batch and opened:
                on_batch(batch, probs, opened)
            fed_batches.append((fed.indices, fed.errors))  # not the batch: its pixels would pile up
        opened_all = [i for indices, errors in fed_batches for i in indices if i not in errors]
        raw = {n: torch.stack(p).double().numpy() for n, p in table.items() if p}
        adapted, mixes = adapt_tree(self.tree, raw, self.priors) if raw else ({}, {})
        self.estimated_mix = {n: mix.tolist() for n, mix in mixes.items()}
        row_of = {i: r for r, i in enumerate(opened_all)}

        def lookup(requests: Sequence[Request]) -> dict[Request, list[float]]:
            return {(r, n): adapted[n][r].tolist() if n in adapted else [1.0] for r, n in requests}

        predictions = self._decode(len(opened_all), lookup, top_k, decode, min_confidence,
                                   {r: answers.get(i, {}) for i, r in row_of.items()})  # fmt: skip
        for indices, errors in fed_batches:
            for i in indices:
                pred = predictions[row_of[i]] if i in row_of else Prediction(image="", error=str(errors[i]))
                pred.image = source_name(sources[i], i)
                yield pred


def open_cascade(
    models: str | Path, runtime: str = "torch", device: str = "auto", precision: str = AS_TRAINED,
    attributes: bool = True,
) -> Cascade:  # fmt: skip
    """The Cascade over a trained folder (``torch``) or an ``lcpn export`` folder (``onnx``, run by
    onnxruntime): the same decoding either way. Raises ``ArtefactError`` for the other kind of folder."""
    models = Path(models)
    if runtime == "torch":
        if (models / MANIFEST).is_file():
            raise ArtefactError(f"'{models}' is an ONNX export: add --runtime onnx")
        return Cascade.load(models, device, precision, attributes)
    if device not in ("auto", "cpu") or precision != AS_TRAINED:
        raise ArtefactError("--runtime onnx runs on the CPU in the precision it was exported in; "
                            "leave out --device and --precision")  # fmt: skip
    from .onnx_runtime import load_onnx_models  # onnxruntime is loaded only when asked for

    return Cascade.of(load_onnx_models(models))
