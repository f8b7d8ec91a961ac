"""One parent node's training data and its finished artefact, shared by both modes and the runner.

An attribute (``attributes``) is trained as such a node too: its values are the classes, its
manifests are in ``attributes/<name>/``, and its node id is ``attribute:<name>``.

A node is finished when its folder holds a ``node.json`` made from the same manifests
(``data_hash``) and the same ``training_key``; both modes finish a node through ``finish_node``.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from . import artefacts, fsio
from .artefacts import NodeInfo
from .attributes import AttributeSpec
from .config import TrainConfig
from .errors import LcpnError
from .hierarchy import Hierarchy, names_of
from .recipe import versions
from .report import Outcome, write_node_report


class TrainError(LcpnError):
    """Training cannot start or go on; the message says why in a sentence."""


@dataclass
class NodeData:
    node: str
    classes: list[str]
    train: list[tuple[str, int]]  # (image path, class index)
    val: list[tuple[str, int]]
    data_hash: str  # sha256 of the node's train and val manifests
    folder: str = ""  # the node's folder, the same in the split and in the model folder

    @property
    def title(self) -> str:
        return self.node or "(root)"

    def counts(self) -> dict[str, list[int]]:
        out = {}
        for split, rows in (("train", self.train), ("val", self.val)):
            c = Counter(label for _, label in rows)
            out[split] = [c.get(i, 0) for i in range(len(self.classes))]
        return out


def load_node_data(split_dir: Path, tree: Hierarchy, node: str) -> NodeData:
    """The node's train/val manifests from a ``prepare`` output, labels as child indices."""
    return _read_manifests(split_dir, node, [names_of(c)[-1] for c in tree.children[node]], tree.folders[node])


def load_attribute_data(split_dir: Path, spec: AttributeSpec) -> NodeData:
    """An attribute's train/val manifests, labels as indices of its values."""
    return _read_manifests(split_dir, spec.node, list(spec.values), spec.folder)


def _read_manifests(split_dir: Path, node: str, classes: list[str], relative: str) -> NodeData:
    index = {c: i for i, c in enumerate(classes)}
    folder = split_dir / relative
    digest = hashlib.sha256()
    rows = {}
    for split in ("train", "val"):
        path = folder / f"{split}.csv"
        if not path.is_file():
            raise TrainError(f"'{path}' is missing; run `lcpn prepare` again")
        digest.update(path.read_bytes())
        try:
            rows[split] = [(r["path"], index[r["label"]]) for r in fsio.read_csv(path)]
        except KeyError as exc:
            raise TrainError(f"'{path}' has a label or column the tree does not know: {exc}") from None
    return NodeData(node, classes, rows["train"], rows["val"], digest.hexdigest(), relative)


def select_nodes(tree: Hierarchy, names: Iterable[str]) -> list[str]:
    """Parent nodes to train, top-down; names are node paths ('root' or '' for the root)."""
    wanted = [("" if n in ("root", "(root)", "/") else n.strip("/")) for n in names]
    if not wanted:
        return tree.parents
    unknown = [n for n in wanted if n not in tree.children or tree.is_leaf(n)]
    if unknown:
        choices = ", ".join(n or "root" for n in tree.parents)
        raise TrainError(f"unknown parent node {', '.join(repr(n) for n in unknown)}; the nodes are: {choices}")
    return [n for n in tree.parents if n in wanted]


def is_finished(folder: Path, data_hash: str, config: TrainConfig) -> bool:
    """True when the node folder holds a finished node trained on this data with these options."""
    try:
        info = artefacts.read_info(folder)
    except artefacts.ArtefactError:
        return False
    return info.data_hash == data_hash and config.trains_like(info.config.get("training_key"))


def _recorded_config(config: TrainConfig) -> dict:
    return {**config.resolved().to_dict(), "training_key": config.training_key()}


def finish_node(
    folder: Path,
    data: NodeData,
    config: TrainConfig,
    info_fields: dict,
    state: dict | None,
    outcome: Outcome,
    history: list[dict],
    test_transforms=None,
    inv_norm=None,
) -> NodeInfo:
    """Write the report, the weights and the pickles, then ``node.json`` (last)."""
    metrics = write_node_report(folder, data.title, outcome, history, data.counts())
    info = NodeInfo(
        node=data.node, classes=data.classes, mode=config.mode, backbone=config.backbone,
        config=_recorded_config(config), metrics=metrics, data_hash=data.data_hash, history=history,
        versions=versions(), **info_fields,
    )  # fmt: skip
    artefacts.save_node(folder, info, state, test_transforms, inv_norm)
    return info


def save_constant_node(folder: Path, data: NodeData, config: TrainConfig) -> NodeInfo:
    """A parent with one child needs no network: every image goes to that child."""
    info = NodeInfo(
        node=data.node, classes=data.classes, kind="constant", mode=config.mode, backbone=config.backbone,
        config=_recorded_config(config), data_hash=data.data_hash,
        metrics={"accuracy": 1.0, "n": len(data.val), "evaluated_on": "val"}, versions=versions(),
    )  # fmt: skip
    artefacts.save_node(folder, info, None)
    return info


@dataclass
class NodeResult:
    node: str
    status: str  # trained, skipped, constant
    info: NodeInfo
    seconds: float = 0.0  # time spent on the node in this run


def chosen_setting(info: NodeInfo) -> str | None:
    """What model selection kept: the best epoch, or a linear head's L2 strength."""
    best = [h for h in info.history if h.get("best")]
    if not best:
        return None
    if "C" in best[-1]:
        return f"C={best[-1]['C']} of {len(info.history)} tried"
    return f"epoch {best[-1]['epoch']} of {len(info.history)}"


def summary_line(r: NodeResult) -> str:
    info, title = r.info, r.node or "(root)"
    if r.status == "constant":
        return f"{title}: single child '{info.classes[0]}', constant node (not trained)"
    m = info.metrics
    chosen = chosen_setting(info) or "-"
    what = "already trained, skipped" if r.status == "skipped" else f"{r.seconds:.1f} s"
    return (
        f"{title}: {len(info.classes)} classes, {m.get('evaluated_on', 'val')} accuracy {m['accuracy']:.4f} "
        f"(n={m['n']}), {chosen}; {what}"
    )
