"""Fit one classifier per parent node (finetune mode), resumably, and save its artefact folder.

Recipe: AdamW with a linear warm-up then cosine decay (per step), label smoothing, augmentation,
class-weighted cross-entropy against imbalance, early stopping on validation accuracy with the
best weights restored, channels_last, and mixed precision on CUDA.

Imbalance: the loss weights each class by 1/sqrt(its share of the node's train images), capped
at 10 times the weight of the largest class and normalised so the average weight per image is 1.
Full inverse-frequency weights (or oversampling) would repeat a 2-image class dozens of times per
epoch and overfit it; the square root lifts rare classes without letting them dominate.

Resume: after every epoch a checkpoint (model, optimizer, scheduler, history, best weights) is
written atomically into the node folder. A run that is killed and started again continues after
the last finished epoch; a node whose ``node.json`` matches the data and options is skipped.
"""

from __future__ import annotations

import hashlib
import logging
import math
import platform
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from . import __version__, artefacts, backbones, fsio
from .artefacts import CHECKPOINT, NodeInfo
from .config import TrainConfig
from .devices import resolve_device
from .errors import LcpnError
from .hierarchy import Hierarchy, names_of
from .images import ImageError, open_rgb
from .report import Outcome, write_node_report
from .transforms import DataConfig, eval_transform, inv_normalize, train_transform

log = logging.getLogger(__name__)


class TrainError(LcpnError):
    """Training cannot start or go on; the message says why in a sentence."""


# --- data ------------------------------------------------------------------------------------------
@dataclass
class NodeData:
    node: str
    classes: list[str]
    train: list[tuple[str, int]]  # (image path, class index)
    val: list[tuple[str, int]]
    data_hash: str  # sha256 of the node's train and val manifests

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
    classes = [names_of(c)[-1] for c in tree.children[node]]
    index = {c: i for i, c in enumerate(classes)}
    folder = split_dir / tree.folders[node]
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
    return NodeData(node, classes, rows["train"], rows["val"], digest.hexdigest())


class ImageDataset(Dataset):
    """(path, label) rows opened safely; an unreadable file yields None and is dropped in batching."""

    def __init__(self, rows: list[tuple[str, int]], transform: Callable) -> None:
        self.rows, self.transform = rows, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        path, label = self.rows[i]
        try:
            return self.transform(open_rgb(path)), label, i
        except ImageError as exc:
            log.warning("skipping %s: %s", path, exc)
            return None


def collate_skip_bad(batch: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    xs, ys, idx = zip(*batch)
    return torch.stack(xs), torch.tensor(ys), torch.tensor(idx)


# --- helpers shared with features mode -----------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def class_weights(counts: list[int], max_ratio: float = 10.0) -> torch.Tensor:
    """1/sqrt(frequency) per class, at most ``max_ratio`` times the weight of the largest class,
    scaled so the mean weight over the training images is 1.

    The cap matters for classes of one or two images: uncapped, a 1-image class next to a
    6,000-image one weighs 80 times more and the head learns to predict it everywhere.
    """
    c = torch.tensor(counts, dtype=torch.float32)
    floor = c.max() / max_ratio**2
    w = torch.where(c > 0, torch.maximum(c, floor).rsqrt(), torch.zeros_like(c))
    return w * c.sum() / (w * c).sum()


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def versions() -> dict[str, str]:
    return {
        "lcpn": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }  # fmt: skip


def is_finished(folder: Path, data_hash: str, config: TrainConfig) -> bool:
    """True when the node folder holds a finished node trained on this data with these options."""
    try:
        info = artefacts.read_info(folder)
    except artefacts.ArtefactError:
        return False
    return info.data_hash == data_hash and info.config.get("training_key") == config.training_key()


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
        config={**config.to_dict(), "training_key": config.training_key()},
        metrics=metrics, data_hash=data.data_hash, history=history, versions=versions(), **info_fields,
    )  # fmt: skip
    artefacts.save_node(folder, info, state, test_transforms, inv_norm)
    return info


def save_constant_node(folder: Path, data: NodeData, config: TrainConfig) -> NodeInfo:
    """A parent with one child needs no network: every image goes to that child."""
    info = NodeInfo(
        node=data.node, classes=data.classes, kind="constant", mode=config.mode, backbone=config.backbone,
        config={**config.to_dict(), "training_key": config.training_key()}, data_hash=data.data_hash,
        metrics={"accuracy": 1.0, "n": len(data.val), "evaluated_on": "val"}, versions=versions(),
    )  # fmt: skip
    artefacts.save_node(folder, info, None)
    return info


def data_config_for(config: TrainConfig) -> DataConfig:
    spec = backbones.spec(config.backbone)
    return DataConfig(config.image_size or spec.image_size, spec.mean, spec.std)


# --- finetune mode -------------------------------------------------------------------------------
@dataclass
class _Amp:
    device: torch.device

    def __post_init__(self) -> None:
        self.enabled = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if self.enabled and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.enabled and self.dtype == torch.float16)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.enabled)


def _loader(rows, transform, config: TrainConfig, shuffle: bool, device: torch.device) -> DataLoader:
    generator = torch.Generator().manual_seed(config.seed)
    return DataLoader(
        ImageDataset(rows, transform), batch_size=config.batch_size, shuffle=shuffle, generator=generator,
        num_workers=config.workers, collate_fn=collate_skip_bad, pin_memory=device.type == "cuda",
        persistent_workers=False,
    )  # fmt: skip


def _run_epoch(model, loader, device, amp: _Amp, loss_fn, optimizer=None, scheduler=None, desc="") -> dict:
    """One pass; trains when an optimizer is given. Returns loss, accuracy and the predictions."""
    training = optimizer is not None
    model.train(training)
    total_loss, correct, seen = 0.0, 0, 0
    indices, preds, confs = [], [], []
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True, disable=None)
    with torch.set_grad_enabled(training):
        for batch in bar:
            if batch is None:
                continue
            x, y, idx = batch
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with amp.autocast():
                logits = model(x)
                loss = loss_fn(logits.float(), y)
            if training:
                optimizer.zero_grad(set_to_none=True)
                amp.scaler.scale(loss).backward()
                amp.scaler.step(optimizer)
                amp.scaler.update()
                scheduler.step()
            prob = logits.detach().float().softmax(1)
            conf, pred = prob.max(1)
            total_loss += loss.item() * len(y)
            correct += (pred == y).sum().item()
            seen += len(y)
            indices += idx.tolist()
            preds += pred.cpu().tolist()
            confs += conf.cpu().tolist()
            bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
    if seen == 0:
        return {"loss": None, "acc": None, "indices": [], "preds": [], "confs": []}
    return {
        "loss": total_loss / seen,
        "acc": correct / seen,
        "indices": indices,
        "preds": preds,
        "confs": confs,
    }


def fit_node(data: NodeData, folder: Path, config: TrainConfig) -> NodeInfo:
    """Train one node in finetune mode, resuming from its checkpoint if one fits."""
    device = resolve_device(config.device)
    seed_everything(config.seed)
    dcfg = data_config_for(config)
    try:
        model = backbones.create(config.backbone, len(data.classes), config.pretrained, config.weights)
    except backbones.WeightsError as exc:
        raise TrainError(str(exc)) from None
    model = model.to(device, memory_format=torch.channels_last)
    amp = _Amp(device)
    train_loader = _loader(data.train, train_transform(dcfg, config.augment), config, True, device)
    val_rows = data.val or data.train
    evaluated_on = "val" if data.val else "train (no val images)"
    val_loader = _loader(val_rows, eval_transform(dcfg), config, False, device)

    weights = class_weights(data.counts()["train"]).to(device)
    loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=config.label_smoothing)
    # Val loss unweighted: it measures the model, and a class missing from train has weight 0.
    eval_loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = max(1, len(train_loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(config.epochs * steps, int(config.warmup_epochs * steps))
    )

    key = {"data_hash": data.data_hash, "training_key": config.training_key()}
    state = {"epoch": 0, "history": [], "best_state": None, "best": None, "bad_epochs": 0}
    ckpt_path = folder / CHECKPOINT
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        if ckpt.get("key") == key:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            state = ckpt["state"]
            torch.set_rng_state(ckpt["rng"])
            log.info("%s: resuming after epoch %d", data.title, state["epoch"])
            tqdm.write(f"{data.title}: resuming after epoch {state['epoch']}")
        else:
            log.info("%s: ignoring a checkpoint made with other data or options", data.title)

    start = time.perf_counter()
    for epoch in range(state["epoch"] + 1, config.epochs + 1):
        if state["bad_epochs"] >= config.patience:
            break
        t0 = time.perf_counter()
        tr = _run_epoch(model, train_loader, device, amp, loss_fn, optimizer, scheduler,
                        desc=f"{data.title} epoch {epoch}/{config.epochs}")  # fmt: skip
        ev = _run_epoch(model, val_loader, device, amp, eval_loss_fn, desc=f"{data.title} eval")
        score = (ev["acc"], -ev["loss"])
        improved = state["best"] is None or score > tuple(state["best"])
        if improved:
            state["best"], state["bad_epochs"] = list(score), 0
            state["best_state"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            state["bad_epochs"] += 1
        state["history"].append({
            "epoch": epoch, "train_loss": tr["loss"], "train_acc": tr["acc"], "val_loss": ev["loss"],
            "val_acc": ev["acc"], "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - t0,
            "best": improved,
        })  # fmt: skip
        state["epoch"] = epoch
        tqdm.write(
            f"{data.title} epoch {epoch}: train loss {tr['loss']:.4f} acc {tr['acc']:.3f} | "
            f"{evaluated_on.split()[0]} loss {ev['loss']:.4f} acc {ev['acc']:.3f}" + (" *" if improved else "")
        )
        with fsio.atomic_path(ckpt_path) as tmp:
            torch.save(
                {
                    "key": key,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "state": state,
                    "rng": torch.get_rng_state(),
                },
                tmp,
            )

    model.load_state_dict(state["best_state"])
    final = _run_epoch(model, val_loader, device, amp, eval_loss_fn, desc=f"{data.title} final eval")
    seen = final["indices"]  # the val loader is not shuffled: rows in order, unreadable ones skipped
    outcome = Outcome(
        classes=data.classes, paths=[val_rows[i][0] for i in seen], y_true=[val_rows[i][1] for i in seen],
        y_pred=final["preds"], confidence=final["confs"], evaluated_on=evaluated_on,
    )  # fmt: skip
    info = finish_node(
        folder, data, config, {"data": dcfg.to_dict()},
        state["best_state"], outcome, state["history"], eval_transform(dcfg), inv_normalize(dcfg),
    )  # fmt: skip
    ckpt_path.unlink(missing_ok=True)
    info.metrics["seconds"] = time.perf_counter() - start
    return info


# --- all nodes -----------------------------------------------------------------------------------
@dataclass
class NodeResult:
    node: str
    status: str  # trained, skipped, constant
    info: NodeInfo


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


def write_model_index(out: Path, tree: Hierarchy, config: TrainConfig, split_dir: Path) -> None:
    fsio.write_json(out / "hierarchy.json", {
        **tree.to_dict(), "config": config.to_dict(), "split": str(split_dir.resolve()), "versions": versions(),
    })  # fmt: skip


def train_nodes(
    split_dir: str | Path,
    out: str | Path,
    config: TrainConfig,
    nodes: Iterable[str] = (),
    force: bool = False,
) -> list[NodeResult]:
    """Train the named parent nodes (all by default) of a prepared split into ``out``."""
    split_dir, out = Path(split_dir), Path(out)
    if not (split_dir / "hierarchy.json").is_file():
        raise TrainError(f"'{split_dir}' is not a prepared split (no hierarchy.json); run `lcpn prepare` first")
    tree = Hierarchy.load(split_dir / "hierarchy.json")
    chosen = select_nodes(tree, nodes)
    backbones.spec(config.backbone)
    out.mkdir(parents=True, exist_ok=True)
    write_model_index(out, tree, config, split_dir)
    if config.mode == "features":
        from .features import train_features

        return train_features(split_dir, out, tree, chosen, config, force)
    results = []
    for node in chosen:
        data = load_node_data(split_dir, tree, node)
        folder = out / tree.folders[node]
        if len(data.classes) == 1:
            results.append(NodeResult(node, "constant", save_constant_node(folder, data, config)))
        elif not force and is_finished(folder, data.data_hash, config):
            results.append(NodeResult(node, "skipped", artefacts.read_info(folder)))
        else:
            if force:
                (folder / CHECKPOINT).unlink(missing_ok=True)
            results.append(NodeResult(node, "trained", fit_node(data, folder, config)))
        tqdm.write(summary_line(results[-1]))
    return results


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
    what = "already trained, skipped" if r.status == "skipped" else f"{m.get('seconds', 0):.1f} s"
    return (
        f"{title}: {len(info.classes)} classes, {m.get('evaluated_on', 'val')} accuracy {m['accuracy']:.4f} "
        f"(n={m['n']}), {chosen}; {what}"
    )
