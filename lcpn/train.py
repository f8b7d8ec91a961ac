"""``train_nodes``: train the parent nodes of a prepared split, in finetune or features mode.

The pieces: ``recipe`` (seeding, class weights, schedule), ``nodes`` (a node's data and finished
artefact), ``runner`` (the one node loop: skip, lock, build, swap in), ``finetune`` and
``features`` (the modes). A run that is killed and started again continues: finished nodes are
skipped and an interrupted finetune node resumes after its last finished epoch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
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

RESUME_ADVICE = (
    "free some space and run the same command again: finished nodes are kept and an interrupted node resumes"
)


def write_model_index(
    out: Path, tree: Hierarchy, config: TrainConfig, split_dir: Path, attributes: dict[str, AttributeSpec]
) -> None:
    """``<out>/hierarchy.json``: the tree, the options, the split, and the attributes trained into ``out``."""
    index = {**tree.to_dict(), "config": config.resolved().to_dict(), "split": str(split_dir.resolve()),
             "versions": versions()}  # fmt: skip
    if attributes:
        index["attributes"] = {name: spec.to_dict() for name, spec in attributes.items()}
    fsio.write_json(out / "hierarchy.json", index)


@dataclass
class TrainingPlan:
    """What one ``lcpn train`` call trains: checked before any work, shared by every way of running it."""

    split_dir: Path
    out: Path
    tree: Hierarchy
    chosen: list[str]  # parent nodes, top-down
    attributes: list[AttributeSpec]  # the attributes to train
    known: dict[str, AttributeSpec]  # every attribute the split records
    config: TrainConfig

    def write_index(self) -> None:
        """Create ``out`` and write its hierarchy.json; attributes trained into it before stay listed."""
        self.out.mkdir(parents=True, exist_ok=True)
        kept = {s.name for s in self.attributes} | set(read_specs(self.out))
        write_model_index(self.out, self.tree, self.config, self.split_dir,
                          {n: s for n, s in self.known.items() if n in kept})  # fmt: skip


def plan_training(
    split_dir: str | Path,
    out: str | Path,
    config: TrainConfig,
    nodes: Iterable[str] | None = (),
    attributes: Iterable[str] | None = None,
) -> TrainingPlan:
    """Check the split, the names and the options of a training run (arguments as for ``train_nodes``)."""
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
    return TrainingPlan(split_dir, out, tree, chosen, wanted, known, config)


def train_nodes(
    split_dir: str | Path,
    out: str | Path,
    config: TrainConfig,
    nodes: Iterable[str] | None = (),
    force: bool = False,
    attributes: Iterable[str] | None = None,
    write_index: bool = True,
) -> list[NodeResult]:
    """Train the named parent nodes and attributes of a prepared split into ``out``.

    ``nodes``: empty for every parent node, None for none. ``attributes``: None for every attribute
    the split records when every node is trained and none otherwise, or the names to train.
    ``write_index``: False when a coordinating run wrote ``<out>/hierarchy.json`` (``ray_engine``).
    """
    plan = plan_training(split_dir, out, config, nodes, attributes)
    config = plan.config
    mode = FeaturesMode(plan.split_dir, plan.out, config) if config.mode == "features" else FinetuneMode(config)
    with disk_full_as_error(plan.out, RESUME_ADVICE):
        plan.out.mkdir(parents=True, exist_ok=True)
        if write_index and distributed.is_main():  # under torchrun, rank 0 writes (see distributed)
            plan.write_index()
        return run_nodes(plan.split_dir, plan.out, plan.tree, plan.chosen, config, mode, force, plan.attributes)
