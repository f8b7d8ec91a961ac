"""Model folders written directly (random EfficientNet-Lite0 weights, 32 px, nothing trained).

They load like the folders `lcpn train` writes, in a fraction of the time, for tests of loading,
precision and routing that do not need a model that has learnt anything.
"""

from __future__ import annotations

from pathlib import Path

from lcpn import backbones, fsio
from lcpn.artefacts import NodeInfo, build_head, save_node
from lcpn.hierarchy import Hierarchy, names_of
from lcpn.transforms import DataConfig, eval_transform

LITE0 = "efficientnet-lite0"
DATA = DataConfig(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
FEATURES = 1280  # Lite0's final features


def model_folder(
    root: Path, leaves: list[str], mode: str = "finetune", node_config: dict | None = None,
    backbone_config: dict | None = None, split: Path | None = None, backbone: str = LITE0,
) -> Path:  # fmt: skip
    """Write a model folder for the tree of ``leaves``; ``node_config`` goes into each trained node's node.json."""
    tree = Hierarchy.from_leaves(leaves)
    fsio.write_json(root / "hierarchy.json", {**tree.to_dict(), **({"split": str(split)} if split else {})})
    if mode == "features":
        info = NodeInfo(node="(shared backbone)", classes=[], kind="backbone", mode="features", backbone=backbone,
                        data=DATA.to_dict(), config=backbone_config or {"bf16": False})  # fmt: skip
        save_node(root / "backbone", info, backbones.build(backbone, 0).state_dict())
    for node in tree.parents:
        classes = [names_of(c)[-1] for c in tree.children[node]]
        folder = root / tree.folders[node]
        common = {"node": node, "classes": classes, "mode": mode, "backbone": backbone, "data": DATA.to_dict()}
        if len(classes) == 1:
            save_node(folder, NodeInfo(**common, kind="constant"), None)
        elif mode == "features":
            info = NodeInfo(**common, head={"type": "linear", "in_features": FEATURES}, config=node_config or {})
            save_node(folder, info, build_head(info, FEATURES).state_dict())
        else:
            info = NodeInfo(**common, config=node_config or {})
            save_node(folder, info, backbones.build(backbone, len(classes)).state_dict(), eval_transform(DATA))
    return root
