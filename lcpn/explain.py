"""Grad-CAM for every stage of a predicted path: where in the picture each node looked for its choice.

A stage is one node's decision on the path (the root's, then each chosen child's). Its heatmap is
Grad-CAM (the ``grad-cam`` package) of the chosen class, taken at the output of the network's last
convolution stage (``_blocks[-1]``, the same layer in every EfficientNet and EfficientNet-Lite):

- finetune mode: the node's own network, on the node's own eval transform;
- features mode: the node's head on top of the shared backbone (``Embedder``), so the gradients
  flow from the head through the backbone's last stage, including the pooled stage features.

Constant nodes (a single child) decide nothing, so they get no heatmap, only a note. The heatmap
is mapped back from the network's square input to the picture's own frame (squash, letterbox or
crop, as the model was trained), so it lies over the image it explains. The stage probabilities
are the cascade's own (with test flips where the model has them); the CAM reads the plain view.
Networks run in float32 here, whatever precision prediction uses: gradients in bf16 are coarse.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from . import artefacts
from .cascade import DEFAULT_DECODE, Cascade, Prediction
from .hierarchy import ROOT, names_of, node_id
from .models import ConstantNode, HeadNode, NetworkNode
from .transforms import DataConfig

CONSTANT_NOTE = "constant node: a single child, nothing to explain"


@dataclass
class Stage:
    """One node's decision on the predicted path."""

    node: str  # the deciding node's id ('' for the root)
    chosen: str  # the class it chose
    probability: float
    heatmap: np.ndarray | None  # Grad-CAM in [0, 1], the picture's height x width; None for a constant node
    note: str = ""


@dataclass
class Explanation:
    prediction: Prediction
    stages: list[Stage]


class _HeadOnBackbone(nn.Module):
    """A features-mode node as one network: the shared backbone's embedding, then the node's head."""

    def __init__(self, embedder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.embedder, self.head = embedder, head
        self.head_device = next(head.parameters()).device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedder(x).float().to(self.head_device))


class _WithInputGradient(nn.Module):
    """The networks are frozen (no weight gradients to store); a CAM needs gradients of the
    activations, so the input asks for them instead."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x.detach().requires_grad_(True))


class Explainer:
    """Grad-CAM per stage for the nodes of a loaded ``Cascade``; not thread-safe (CAM hooks live on the
    shared networks), so a server runs it on the same single thread as its predictions."""

    def __init__(self, cascade: Cascade, models: str | Path) -> None:
        self.cascade = cascade
        self._data: dict[str, DataConfig] = {}
        for node, model in cascade.nodes.items():
            if isinstance(model, NetworkNode):
                model.network.requires_grad_(False)
                info = artefacts.read_info(Path(models) / cascade.tree.folders[node])
                self._data[node] = artefacts.data_config(info)
            elif isinstance(model, HeadNode):
                model.head.requires_grad_(False)
                model.backbone.embedder.requires_grad_(False)
                self._data[node] = model.backbone.data

    def explain(
        self, image: Image.Image, top_k: int = 1, decode: str = DEFAULT_DECODE, min_confidence: float = 0.0
    ) -> Explanation:
        """The prediction for one RGB picture and a Grad-CAM heatmap for every stage of its path."""
        prediction = self.cascade.predict_batch([image], top_k, decode, min_confidence)[0]
        stages, node = [], ROOT
        for chosen, probability in zip(prediction.path, prediction.confidences):
            model = self.cascade.nodes[node]
            if isinstance(model, ConstantNode):
                stages.append(Stage(node, chosen, probability, None, CONSTANT_NOTE))
            else:
                heatmap = self.heatmap(node, image, model.classes.index(chosen))
                stages.append(Stage(node, chosen, probability, heatmap))
            node = node_id((*names_of(node), chosen))
        return Explanation(prediction, stages)

    def heatmap(self, node: str, image: Image.Image, class_index: int) -> np.ndarray:
        """Grad-CAM of ``class_index`` of ``node`` on ``image``, in the picture's own frame."""
        model = self.cascade.nodes[node]
        if isinstance(model, HeadNode):
            network, transform = _HeadOnBackbone(model.backbone.embedder, model.head), model.backbone.transform
            last_stage = model.backbone.embedder.network._blocks[-1]
        else:
            network, transform, last_stage = model.network, model.transform, model.network._blocks[-1]
        x = transform(image).unsqueeze(0)
        with GradCAM(_WithInputGradient(network), [last_stage]) as cam:
            square = cam(x, [ClassifierOutputTarget(class_index)])[0]
        return to_picture_frame(square, self._data[node], image.size)


def to_picture_frame(square: np.ndarray, data: DataConfig, size: tuple[int, int]) -> np.ndarray:
    """A map over the network's square input, laid back over the picture of ``size`` (width, height)
    by undoing ``transforms._to_square``; parts of the picture the network did not see are 0."""
    width, height = size
    if data.square == "squash":
        return _resized(square, width, height)
    side = max(width, height) if data.square == "letterbox" else min(width, height)
    full = _resized(square, side, side)
    # Both centre the picture: letterbox pads it to the square, crop takes the square out of it.
    left, top = round((side - width) / 2), round((side - height) / 2)
    if data.square == "letterbox":
        return full[top : top + height, left : left + width]
    out = np.zeros((height, width), dtype=np.float32)
    out[-top : -top + side, -left : -left + side] = full
    return out


def _resized(values: np.ndarray, width: int, height: int) -> np.ndarray:
    as_image = Image.fromarray(values.astype(np.float32), mode="F").resize((width, height), Image.BILINEAR)
    return np.clip(np.asarray(as_image), 0.0, 1.0)


def heatmap_colours(heatmap: np.ndarray) -> np.ndarray:
    """The heatmap in the JET colour map as RGB bytes (what Grad-CAM overlays on the picture)."""
    black = np.zeros((*heatmap.shape, 3), dtype=np.float32)
    return show_cam_on_image(black, heatmap, use_rgb=True, image_weight=0.0)


def heatmap_png(heatmap: np.ndarray) -> bytes:
    """The coloured heatmap as PNG bytes, the picture's size."""
    buf = io.BytesIO()
    Image.fromarray(heatmap_colours(heatmap), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def overlay(image: Image.Image, heatmap: np.ndarray) -> Image.Image:
    """The picture with its heatmap blended over it, half and half."""
    pixels = np.asarray(image, dtype=np.float32) / 255
    return Image.fromarray(show_cam_on_image(pixels, heatmap, use_rgb=True, image_weight=0.5), "RGB")


def stage_title(stage: Stage) -> str:
    return f"{stage.node or 'root'} -> {stage.chosen} ({stage.probability:.2f})"


def save_stage_figure(path: Path, image: Image.Image, stage: Stage) -> None:
    """One PNG for one stage: the picture, its heatmap overlay (or the constant node's note), the title."""
    from .report import plt, save_figure  # report sets matplotlib's file-only backend

    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.6))
    axes[0].imshow(image)
    if stage.heatmap is None:
        axes[1].text(0.5, 0.5, stage.note.replace(": ", ":\n", 1), ha="center", va="center", wrap=True)
    else:
        axes[1].imshow(overlay(image, stage.heatmap))
    for ax in axes:
        ax.axis("off")
    fig.suptitle(stage_title(stage))
    save_figure(fig, path)


def save_contact_sheet(path: Path, rows: Sequence[tuple[str, Image.Image, list[Stage]]]) -> None:
    """One row per picture: the picture, then each stage's overlay with its node, class and probability."""
    from .report import plt, save_figure  # report sets matplotlib's file-only backend

    columns = 1 + max((len(stages) for _, _, stages in rows), default=0)
    fig, axes = plt.subplots(len(rows), columns, figsize=(2.4 * columns, 2.6 * len(rows)), squeeze=False)
    for (name, image, stages), line in zip(rows, axes):
        line[0].imshow(image)
        line[0].set_title(_short(name), fontsize=8)
        for stage, ax in zip(stages, line[1:]):
            ax.imshow(image if stage.heatmap is None else overlay(image, stage.heatmap))
            ax.set_title(stage_title(stage) + ("\nconstant node" if stage.heatmap is None else ""), fontsize=7)
        for ax in line:
            ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)


def _short(text: str, limit: int = 32) -> str:
    return text if len(text) <= limit else "..." + text[-(limit - 3) :]
