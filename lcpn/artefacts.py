"""One node's artefact folder: save it atomically, load it safely.

Layout (see DESIGN.md)::

    model.pth                   state_dict only, read with torch.load(weights_only=True)
    node.json                   written last: its presence marks a finished node
    bin/encoder.pickle          {index: class name}
    bin/test_transforms.pickle  torchvision eval transform
    bin/inv_normalize.pickle    torchvision Normalize that undoes the normalisation
    performance.txt and plots   written by ``report``

This is the only module that reads pickles, through an unpickler that admits an explicit
allow-list of classes, so a model folder from the internet cannot run code when it is loaded.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import backbones, fsio
from .errors import LcpnError
from .transforms import DataConfig

NODE_JSON = "node.json"
MODEL = "model.pth"
CHECKPOINT = "checkpoint.pt"
ENCODER = "bin/encoder.pickle"
TEST_TRANSFORMS = "bin/test_transforms.pickle"
INV_NORMALIZE = "bin/inv_normalize.pickle"
FORMAT_VERSION = 1

_TV = "torchvision.transforms.transforms"
ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "set"),
    ("builtins", "frozenset"), ("builtins", "int"), ("builtins", "float"), ("builtins", "str"),
    ("builtins", "bool"),
    ("torchvision.transforms.functional", "InterpolationMode"),
    ("lcpn.transforms", "PadToSquare"),
    *((_TV, name) for name in (
        "Compose", "Resize", "CenterCrop", "ToTensor", "Normalize", "PILToTensor", "ConvertImageDtype",
        "RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter",
    )),
}  # fmt: skip


class ArtefactError(LcpnError):
    """A model folder that cannot be loaded; the message says which file and why."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"'{module}.{name}' is not on the allow-list")
        return super().find_class(module, name)


def safe_unpickle(path: str | Path) -> Any:
    """Unpickle a file that may only contain plain data and known torchvision transforms."""
    path = Path(path)
    try:
        return _RestrictedUnpickler(io.BytesIO(path.read_bytes())).load()
    except FileNotFoundError:
        raise ArtefactError(f"'{path}' is missing") from None
    except Exception as exc:  # anything a malformed pickle raises
        raise ArtefactError(f"refusing to load '{path}': {exc}") from None


def write_pickle(path: Path, obj: Any) -> None:
    fsio.write_bytes(path, pickle.dumps(obj, protocol=4))


@dataclass
class NodeInfo:
    """What ``node.json`` holds: enough to rebuild the network before loading its weights."""

    node: str
    classes: list[str]  # child class names, in output index order
    kind: str = "classifier"  # "classifier" or "constant" (a single child, nothing trained)
    mode: str = "finetune"  # "finetune": whole network; "features": a head on the shared backbone
    backbone: str = ""
    data: dict = field(default_factory=dict)  # DataConfig as a dict
    head: dict = field(default_factory=dict)  # features mode: {"type": "linear"|"mlp", "hidden": n}
    finetune: dict = field(default_factory=dict)  # finetune mode: the probe it started from, the WiSE-FT mix kept
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    data_hash: str = ""
    history: list = field(default_factory=list)
    versions: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> NodeInfo:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def read_info(folder: str | Path) -> NodeInfo:
    path = Path(folder) / NODE_JSON
    try:
        return NodeInfo.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise ArtefactError(f"'{path}' is missing: the node was never trained or training did not finish") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise ArtefactError(f"'{path}' is not a valid node description ({exc})") from None


def save_node(
    folder: str | Path,
    info: NodeInfo,
    state_dict: dict[str, torch.Tensor] | None,
    test_transforms: Any = None,
    inv_normalize: Any = None,
) -> None:
    """Write a node's files; ``node.json`` goes last so a half-saved node never looks finished."""
    folder = Path(folder)
    if state_dict is not None:
        with fsio.atomic_path(folder / MODEL) as tmp:
            torch.save(state_dict, tmp)
    write_pickle(folder / ENCODER, dict(enumerate(info.classes)))
    if test_transforms is not None:
        write_pickle(folder / TEST_TRANSFORMS, test_transforms)
    if inv_normalize is not None:
        write_pickle(folder / INV_NORMALIZE, inv_normalize)
    fsio.write_json(folder / NODE_JSON, info.to_dict())


class Standardize(nn.Module):
    """Scales embeddings by the training set's per-dimension mean and std (stored as buffers)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ProbabilityAverage(nn.Module):
    """Averages the softmax outputs of its branches; returns log-probabilities (softmax-compatible)."""

    def __init__(self, branches: list[nn.Module]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([b(x).softmax(-1) for b in self.branches]).mean(0)
        return probs.clamp_min(1e-12).log()


def build_head(info: NodeInfo, in_dim: int) -> nn.Sequential:
    """The head that features mode trains on the shared backbone's embeddings: ``Standardize``
    then a linear layer, an MLP (or several, averaged), or both averaged (``ensemble``)."""
    n, kind = len(info.classes), info.head.get("type", "linear")
    dropout, hidden = float(info.head.get("dropout", 0.0)), int(info.head.get("hidden", 0))
    members = int(info.head.get("members", 1))
    if kind not in ("linear", "mlp", "ensemble"):
        raise ValueError(f"unknown head type '{kind}'")

    def linear() -> nn.Sequential:
        return nn.Sequential(nn.Linear(in_dim, n))

    def mlp() -> nn.Sequential:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout),
                             nn.Linear(hidden, n))  # fmt: skip

    def mlps() -> nn.Module:
        return mlp() if members == 1 else ProbabilityAverage([mlp() for _ in range(members)])

    body = {"linear": linear, "mlp": mlps}.get(kind) or (lambda: ProbabilityAverage([linear(), mlps()]))
    return nn.Sequential(Standardize(in_dim), body())


def head_in_features(info: NodeInfo) -> int:
    """The embedding size a features-mode head reads."""
    # Heads from before stage features do not record it: they read the backbone's final features.
    return int(info.head.get("in_features", backbones.spec(info.backbone).feature_dim))


def features_head_info(folder: Path) -> NodeInfo | None:
    """The node.json of a features-mode head in ``folder`` (not a constant node), else None."""
    try:
        info = read_info(folder)
    except ArtefactError:
        return None
    return info if info.mode == "features" and info.kind != "constant" else None


def reads_colour(info: NodeInfo) -> bool:
    """Whether a features-mode head was trained with the colour histogram in its input (or, for the
    backbone's node.json, whether the backbone computes it)."""
    return bool(info.config.get("colour_features", False))


def build_network(info: NodeInfo) -> nn.Module:
    """Rebuild the node's network from ``node.json`` alone (weights are loaded separately)."""
    if info.mode == "features":
        return build_head(info, head_in_features(info))
    return backbones.build(info.backbone, len(info.classes))


@dataclass
class LoadedNode:
    info: NodeInfo
    network: nn.Module | None  # None for a constant node
    encoder: dict[int, str]
    transforms: Any


def load_node(folder: str | Path, map_location: str | torch.device = "cpu") -> LoadedNode:
    """Load a finished node: ``node.json``, the weights, and the pickles (restricted)."""
    folder = Path(folder)
    info = read_info(folder)
    encoder = safe_unpickle(folder / ENCODER)
    if not isinstance(encoder, dict) or [encoder[i] for i in sorted(encoder)] != info.classes:
        raise ArtefactError(f"'{folder / ENCODER}' does not match the classes in {NODE_JSON}")
    if info.kind == "constant":
        return LoadedNode(info, None, encoder, None)
    try:
        network = build_network(info)
    except (ValueError, KeyError) as exc:
        raise ArtefactError(f"'{folder / NODE_JSON}' names an unusable network ({exc})") from None
    load_weights(network, folder / MODEL, map_location)
    network.eval()
    transforms = safe_unpickle(folder / TEST_TRANSFORMS) if info.mode == "finetune" else None
    return LoadedNode(info, network, encoder, transforms)


def _load_state(path: Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A ``state_dict`` saved by ``torch.save``; never anything else (``weights_only=True``)."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise ArtefactError(f"'{path}' is missing") from None
    except Exception as exc:  # the details are torch's internals, and its advice is to load unsafely
        if isinstance(exc, pickle.UnpicklingError) and _looks_pickled(path):
            # weights_only refused a class or a function: a whole pickled model, or something worse.
            raise ArtefactError(
                f"'{path}' is not a plain weights file (it holds pickled objects); lcpn never loads those"
            ) from None
        raise ArtefactError(f"'{path}' is not a PyTorch weights file (damaged, or another format)") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArtefactError(f"'{path}' holds no state_dict (a mapping of tensor names to tensors)")
    return state


def _looks_pickled(path: Path) -> bool:
    """A zip archive (what ``torch.save`` writes) or a bare pickle (protocol 2 and later start with 0x80)."""
    with open(path, "rb") as fh:
        first = fh.read(1)
    return first == b"\x80" or zipfile.is_zipfile(path)


def load_weights(network: nn.Module, path: Path, map_location: str | torch.device = "cpu") -> None:
    """Load ``path`` into ``network``, or say how the file and the network described in node.json differ."""
    state = _load_state(path, map_location)
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or reshaped:
        counts = f"{len(missing)} missing and {len(unexpected)} unexpected tensors"
        if reshaped:
            counts += f", {len(reshaped)} of another shape"
        examples = [f"missing '{k}'" for k in missing[:2]] + [f"unexpected '{k}'" for k in unexpected[:2]]
        examples += [
            f"'{k}' is {_shape(state[k])} in the file, {_shape(expected[k])} in the network" for k in reshaped[:2]
        ]
        raise ArtefactError(f"'{path}' does not fit the network described in {NODE_JSON}: {counts}, "
                            f"e.g. {'; '.join(examples)}")  # fmt: skip
    network.load_state_dict(state)


def _shape(tensor: torch.Tensor) -> str:
    return "x".join(map(str, tensor.shape)) or "a scalar"


def data_config(info: NodeInfo) -> DataConfig:
    return DataConfig.from_dict(info.data)
