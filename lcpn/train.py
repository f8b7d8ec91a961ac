"""``train_nodes``: train the parent nodes of a prepared split, in finetune or features mode.

The pieces: ``recipe`` (seeding, class weights, schedule), ``nodes`` (a node's data and finished
artefact), ``runner`` (the one node loop: skip, lock, build, swap in), ``finetune`` and
``features`` (the modes). A run that is killed and started again continues: finished nodes are
skipped and an interrupted finetune node resumes after its last finished epoch.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from . import backbones, distributed, fsio
from .attributes import AttributeSpec, read_specs, select
from .config import TrainConfig
from .features import FeaturesMode, features_precision
from .finetune import FinetuneMode
from .fsio import disk_full_as_error
from .hierarchy import Hierarchy
from .nodes import NodeResult, TrainError, chosen_setting, select_nodes
from .recipe import versions
from .runner import run_nodes

__all__ = ["TrainError", "chosen_setting", "train_nodes"]  # what the command line imports from here


def write_model_index(
    out: Path, tree: Hierarchy, config: TrainConfig, split_dir: Path, attributes: dict[str, AttributeSpec]
) -> None:
    """``<out>/hierarchy.json``: the tree, the options, the split, and the attributes trained into ``out``."""
    index = {**tree.to_dict(), "config": config.resolved().to_dict(), "split": str(split_dir.resolve()),
             "versions": versions()}  # fmt: skip
    if attributes:
        index["attributes"] = {name: spec.to_dict() for name, spec in attributes.items()}
    fsio.write_json(out / "hierarchy.json", index)


def train_nodes(
    split_dir: str | Path,
    out: str | Path,
    config: TrainConfig,
    nodes: Iterable[str] | None = (),
    force: bool = False,
    attributes: Iterable[str] | None = None,
) -> list[NodeResult]:
    """Train the named parent nodes and attributes of a prepared split into ``out``.

    ``nodes``: empty for every parent node, None for none. ``attributes``: None for every attribute
    the split records when every node is trained and none otherwise, or the names to train.
    """
    split_dir, out = Path(split_dir), Path(out)
    if not (split_dir / "hierarchy.json").is_file():
        raise TrainError(f"'{split_dir}' is not a prepared split (no hierarchy.json); run `lcpn prepare` first")
    tree = Hierarchy.load(split_dir / "hierarchy.json")
    nodes = None if nodes is None else list(nodes)
    chosen = [] if nodes is None else select_nodes(tree, nodes)
    known = read_specs(split_dir)
    if attributes is None:
        attributes = known if nodes == [] else []
    wanted = select(known, attributes, f"the split '{split_dir}'")
    config = config.resolved()
    backbones.spec(config.backbone)
    if config.mode == "features" and distributed.launched():
        raise TrainError("torchrun runs finetune mode only (one node's network on several GPUs); run features "
                         "mode as a plain `lcpn train`, without torchrun")  # fmt: skip
    if config.mode == "features":  # node.json records the precision used: auto and fp32 are one training key
        config = config.replace(precision=features_precision(config.precision))
    mode = FeaturesMode(split_dir, out, config) if config.mode == "features" else FinetuneMode(config)
    resume = "free some space and run the same command again: finished nodes are kept and an interrupted node resumes"
    with disk_full_as_error(out, resume):
        out.mkdir(parents=True, exist_ok=True)
        kept = {s.name for s in wanted} | set(read_specs(out))  # those trained into ``out`` before stay listed
        if distributed.is_main():  # under torchrun, rank 0 writes (see distributed)
            write_model_index(out, tree, config, split_dir, {n: s for n, s in known.items() if n in kept})
        return run_nodes(split_dir, out, tree, chosen, config, mode, force, wanted)
