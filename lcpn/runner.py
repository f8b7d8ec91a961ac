"""The one node loop of ``lcpn train``, for every mode and every way of running it.

For the chosen parent nodes, top-down, then the chosen attributes (flat nodes of their own): skip
the finished ones (before any expensive work), lock the others (``locks``), let the mode prepare
once for exactly the nodes it will train (features mode embeds their images there), then build
each node in a temporary folder and swap it in.
``train_lcpn.sh`` with ``JOBS=N`` runs one ``lcpn train --node`` per node through this same loop,
and ``lcpn train --ray`` runs it for one node per Ray task (``ray_engine``).

A node's folder also holds its child nodes' folders, so it cannot be renamed into place whole.
Instead its ``node.json`` (the mark of a finished node) is removed first and written last; in
between the node reads as unfinished and is retrained by the next run, so a kill never leaves new
figures beside old weights that look finished. Checkpoints stay in the node's folder until the
node is swapped in, where a resumed run finds them.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tqdm.auto import tqdm

from . import artefacts, distributed, locks
from .artefacts import CHECKPOINT, ENCODER, MODEL, NODE_JSON, NodeInfo
from .attributes import AttributeSpec
from .config import TrainConfig
from .hierarchy import Hierarchy
from .nodes import (
    NodeData,
    NodeResult,
    is_finished,
    load_attribute_data,
    load_node_data,
    save_constant_node,
    summary_line,
)
from .report import REPORT_FILES

# Everything a finished node writes into its folder (child nodes' folders sit beside these).
NODE_FILES = (MODEL, Path(ENCODER).parts[0], *REPORT_FILES, NODE_JSON)


@dataclass
class NodeFolder:
    """Where a mode writes one node: its artefact into ``staging``, checkpoints into ``final``."""

    final: Path
    staging: Path | None  # None on torchrun ranks other than 0, which write nothing

    @property
    def checkpoint(self) -> Path:
        return self.final / CHECKPOINT


class Mode(Protocol):
    def prepare(self, todo: list[NodeData]) -> None:
        """Called once before any node is fitted, with only the nodes that will be fitted."""

    def fit(self, data: NodeData, folder: NodeFolder) -> NodeInfo | None:
        """Train one node and finish it (``nodes.finish_node``) in ``folder.staging``; None where nothing is
        written (torchrun ranks other than 0)."""


def run_nodes(
    split_dir: Path, out: Path, tree: Hierarchy, chosen: list[str], config: TrainConfig, mode: Mode, force: bool,
    attributes: Sequence[AttributeSpec] = (),
) -> list[NodeResult]:  # fmt: skip
    """Train the ``chosen`` parent nodes and ``attributes`` into ``out`` with ``mode``; print a line per node."""
    nodes = load_nodes(split_dir, tree, chosen, attributes)

    held: dict[str, locks.NodeLock] = {}  # by folder: attribute and node ids share no name space
    try:
        for data in nodes if distributed.is_main() else ():  # under torchrun rank 0 locks for every rank
            if skipped(data, out, config, force):
                continue
            held[data.folder] = locks.acquire(out / data.folder, data.title)
            if skipped(data, out, config, force):  # another run finished it just before releasing its lock
                held.pop(data.folder).release()
                continue
            clean_leftovers(out / data.folder, drop_checkpoint=force)
        building = distributed.from_main(lambda: set(held))
        todo = [d for d in nodes if d.folder in building and len(d.classes) > 1]
        if todo:
            mode.prepare(todo)
        results = []
        for data in nodes:
            folder = out / data.folder
            if data.folder in building:
                results.append(build_node(data, folder, mode, config))
                if data.folder in held:
                    held.pop(data.folder).release()
            else:
                results.append(NodeResult(data.node, "skipped", artefacts.read_info(folder)))
            tqdm.write(summary_line(results[-1]))
        return results
    finally:
        for lock in held.values():
            lock.release()


def load_nodes(
    split_dir: Path, tree: Hierarchy, chosen: list[str], attributes: Sequence[AttributeSpec]
) -> list[NodeData]:
    """The data of the ``chosen`` parent nodes, then of the ``attributes``: the loop's order."""
    nodes = [load_node_data(split_dir, tree, n) for n in chosen]
    return nodes + [load_attribute_data(split_dir, a) for a in attributes]


def skipped(data: NodeData, out: Path, config: TrainConfig, force: bool) -> bool:
    """Whether the loop skips this node: finished on this data with these options (a constant node is rewritten)."""
    return not force and len(data.classes) > 1 and is_finished(out / data.folder, data.data_hash, config)


def build_node(data: NodeData, folder: Path, mode: Mode, config: TrainConfig) -> NodeResult:
    """Fit (or record as constant) one locked node in a temporary folder, then swap it in."""
    if not distributed.is_main():
        return _follow_node(data, folder, mode)
    staging = folder / f".staging-{os.getpid()}.tmp"
    start = time.perf_counter()
    try:
        staging.mkdir(parents=True)
        if len(data.classes) == 1:
            status, info = "constant", save_constant_node(staging, data, config)
        else:
            status, info = "trained", mode.fit(data, NodeFolder(folder, staging))
        swap_in(staging, folder)
        (folder / CHECKPOINT).unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    distributed.barrier()
    return NodeResult(data.node, status, info, time.perf_counter() - start)


def _follow_node(data: NodeData, folder: Path, mode: Mode) -> NodeResult:
    """A torchrun rank other than 0: fit beside rank 0 (DDP needs every rank), then read what it wrote."""
    start = time.perf_counter()
    if len(data.classes) > 1:
        mode.fit(data, NodeFolder(folder, None))
    distributed.barrier()  # rank 0 has swapped the node in
    status = "trained" if len(data.classes) > 1 else "constant"
    return NodeResult(data.node, status, artefacts.read_info(folder), time.perf_counter() - start)


def swap_in(staging: Path, folder: Path) -> None:
    """Replace the node's own files in ``folder`` by those in ``staging``; node.json goes first and comes last."""
    (folder / NODE_JSON).unlink(missing_ok=True)
    for name in NODE_FILES:
        if not (staging / name).exists():  # e.g. the model of a node that is now constant
            _remove(folder / name)
    for entry in sorted(staging.iterdir(), key=lambda p: p.name == NODE_JSON):
        target = folder / entry.name
        if entry.is_dir() and target.is_dir():  # a folder cannot be replaced in one rename
            old = folder / f".{entry.name}.old-{os.getpid()}.tmp"
            os.rename(target, old)
            os.rename(entry, target)
            shutil.rmtree(old)
        else:
            os.replace(entry, target)


def clean_leftovers(folder: Path, drop_checkpoint: bool = False) -> None:
    """Remove what killed runs left in a node's folder: temporary files and folders (``.*.tmp``)."""
    for parent in (folder, folder / Path(ENCODER).parent):
        if parent.is_dir():
            for entry in parent.iterdir():
                if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                    _remove(entry)
    if drop_checkpoint:
        (folder / CHECKPOINT).unlink(missing_ok=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
