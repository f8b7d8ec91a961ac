"""Features mode: one frozen pretrained backbone shared by every node, a small head per node.

Every image of the split is embedded once and kept in an embedding store on disk
(``embedding_store``), keyed by the image's content (sha256) and view, in a store keyed by
everything that changes the numbers (``embedding_key``); a second run reuses it, a killed run
resumes from its last shard, and any change to the key starts another store. Each parent node
then trains a head (linear or a small MLP) on the stored embeddings in seconds. The backbone is
stored once, in ``<models>/backbone/``, with the precision it embedded in; node folders keep the
usual layout with the head's weights in ``model.pth``.

The embedding is the backbone's pooled final features with, by default, the pooled outputs of its
last two stages appended (``backbones.Embedder``, ``--stage-features``).

Precision: the backbone runs in fp32 unless ``--precision bf16`` is given (``auto`` means fp32
here). bf16 autocast is an opt-in speed-up: 2.7x faster embedding on a CPU with AVX512-BF16, and
slower on an H100 (669 vs 763 img/s; docs/benchmarks.md). Either way the feature maps are pooled
in float32.

Views: view 0 is the plain eval transform; view 1 its mirror image; further views are seeded
random crops. Extra views are training-time augmentation only: val images and prediction use view 0.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn
from tqdm.auto import tqdm

from . import artefacts, backbones
from .artefacts import NodeInfo
from .attributes import ATTRIBUTES_FOLDER
from .colour import VERSION as COLOUR_VERSION
from .colour import ColourHistogram
from .config import TrainConfig
from .devices import bf16_supported, resolve_device, training_note
from .embedding_store import EmbeddingStore
from .feed import default_batch_size, feed
from .fsio import file_sha256
from .hierarchy import Hierarchy
from .nodes import NodeData, TrainError, finish_node
from .progress import progress
from .recipe import class_weights, data_config_for, seed_everything, warmup_cosine
from .report import Outcome
from .runner import NodeFolder
from .runtime import Runtime, SharedBackbone, recorded_precision
from .transforms import eval_transform, inv_normalize, train_transform

log = logging.getLogger(__name__)

SHARD_IMAGES = 1024  # images per shard of the embedding store: a killed run loses at most this many
MLP_HIDDEN = 256  # as accurate as 512 on the catalogue benchmark, and faster to train
MLP_BATCH = 128  # 256 was slower per epoch on a 2-core CPU (docs/benchmarks.md)
# How _Views makes each view; part of the embedding key, so change it with _Views.view. The train transform's
# own description is in the row ids of the views it makes (``_row_id``): changing the augmentation
# recomputes those views only, not a whole store of plain and mirrored views.
COLOUR_STORE = "colour"  # the histograms' store folder starts with this
VIEW_RECIPE = "0: eval transform; 1: mirror, eval transform; n >= 2: train transform seeded by sha256[:8] + n"


# --- embedding ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Views:
    """The embedding pass's ``feed.Prepare``: the missing views of each image, stacked (picklable)."""

    shas: list[str]  # per source
    views: list[list[int]]  # per source, the views to compute
    transform: Callable  # view 0: the eval transform
    crops: Callable  # views 2+: the train transform

    def __call__(self, picture: Image.Image, index: int) -> dict[str, torch.Tensor]:
        return {"views": torch.stack([self.view(picture, v, self.shas[index]) for v in self.views[index]])}

    def view(self, picture: Image.Image, view: int, sha: str) -> torch.Tensor:
        if view == 0:
            return self.transform(picture)
        if view == 1:
            return self.transform(ImageOps.mirror(picture))
        torch.manual_seed(int(sha[:8], 16) + view)  # the same crop for the same image every run
        return self.crops(picture)


def _row_id(sha: str, view: int, augmentation: str) -> str:
    """A view's id in the store; an augmented view's names the train transform (``augmentation_id``) too."""
    return f"{sha}:{view}" if view < 2 else f"{sha}:{view}:{augmentation}"


def augmentation_id(backbone: SharedBackbone) -> str:
    """A digest of the train transform that makes views 2 and up."""
    return hashlib.sha256(repr(train_transform(backbone.data)).encode()).hexdigest()[:12]


def embed_images(
    paths: Sequence[str],
    backbone: SharedBackbone,
    store: EmbeddingStore,
    views: int | Mapping[str, int] = 1,
    batch_size: int = 32,
    workers: int | None = None,
) -> dict[str, torch.Tensor]:
    """{path: (views, dim) embeddings} for every readable path, computing only what the store lacks.

    ``views`` is the number of views for every path, or per path (missing paths get the plain view).
    New embeddings go to the store a shard at a time, so a killed run resumes where it stopped.
    ``workers``: the input pipeline's processes (``feed``). A colour histogram is stored apart from
    the backbone's part, in a store of its own beside ``store``: turning it on or off never runs
    the backbone again.
    """
    if backbone.embedder.colour is not None:
        plain = dataclasses.replace(backbone, embedder=backbone.embedder.without_colour())
        colour = dataclasses.replace(backbone, name=COLOUR_STORE, embedder=backbone.embedder.colour)
        colour_store = EmbeddingStore(store.folder.parent, colour_key(backbone))
        parts = [_embed_stored(paths, b, s, views, batch_size, workers) for b, s in ((colour, colour_store),
                                                                                    (plain, store))]  # fmt: skip
        return {p: torch.cat([parts[0][p], parts[1][p]], 1) for p in parts[1] if p in parts[0]}
    return _embed_stored(paths, backbone, store, views, batch_size, workers)


def _embed_stored(
    paths: Sequence[str], backbone: SharedBackbone, store: EmbeddingStore, views: int | Mapping[str, int],
    batch_size: int, workers: int | None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """``embed_images`` for one store: ``backbone.embedder``'s output, whatever it is."""
    count = (lambda p: views.get(p, 1)) if isinstance(views, Mapping) else (lambda p: views)
    row_id = functools.partial(_row_id, augmentation=augmentation_id(backbone))
    shas = _hash_files(paths)
    wanted_views: dict[str, int] = {}  # per content: identical files share their embeddings
    for p, s in shas.items():
        wanted_views[s] = max(wanted_views.get(s, 0), count(p))
    todo = sorted({s: p for p, s in shas.items()
                   if any(row_id(s, v) not in store for v in range(wanted_views[s]))}.items())  # fmt: skip
    if todo:
        log.info("embedding %d images (%d stored)", len(todo), len(paths) - len(todo))
        missing = [[v for v in range(wanted_views[s]) if row_id(s, v) not in store] for s, _ in todo]
        _embed_missing(todo, missing, backbone, store, batch_size, workers, row_id)
    return {
        p: torch.from_numpy(np.stack([store[row_id(s, v)] for v in range(count(p))]))
        for p, s in shas.items()
        if all(row_id(s, v) in store for v in range(count(p)))
    }


def _hash_files(paths: Sequence[str]) -> dict[str, str]:
    bar = progress(len(paths), "hashing images", leave=False)
    shas = {}
    with ThreadPoolExecutor(4) as pool:
        for path, sha in zip(paths, pool.map(file_sha256, paths)):
            shas[path] = sha
            bar.update(1)
    bar.close()
    return shas


def _embed_missing(
    todo: list[tuple[str, str]],
    missing: list[list[int]],
    backbone: SharedBackbone,
    store: EmbeddingStore,
    batch_size: int,
    workers: int | None,
    row_id: Callable[[str, int], str],
) -> None:
    """Embed the ``missing`` views of ``todo`` ((sha, path) pairs), adding a shard every SHARD_IMAGES images."""
    prepare = _Views([s for s, _ in todo], missing, backbone.transform, train_transform(backbone.data))
    bar = progress(len(todo), "embedding images")
    ids: list[str] = []
    rows: list[np.ndarray] = []
    images_since_shard = 0
    for fed in feed([p for _, p in todo], batch_size, prepare, workers, pin_memory=True):
        for i, exc in fed.errors.items():
            log.warning("skipping %s: %s", todo[i][1], exc)
        if fed.opened:
            stacked = fed.inputs["views"]  # (images, views, C, H, W), or a list when images need different views
            x = stacked.flatten(0, 1) if isinstance(stacked, torch.Tensor) else torch.cat(stacked)
            rows.append(backbone.embed(x).numpy())
            ids += [row_id(todo[i][0], v) for i in fed.opened for v in missing[i]]
        images_since_shard += len(fed.indices)
        bar.update(len(fed.indices))
        if ids and (images_since_shard >= SHARD_IMAGES or fed.indices[-1] == len(todo) - 1):
            store.add(ids, np.concatenate(rows))
            ids, rows, images_since_shard = [], [], 0
    bar.close()


# --- heads ---------------------------------------------------------------------------------------
def head_spec(config: TrainConfig, in_features: int) -> dict:
    """The head's shape as stored in node.json (fitting adds the chosen C of a logistic regression)."""
    if config.head == "linear":
        return {"type": "linear", "in_features": in_features}
    return {"type": config.head, "in_features": in_features, "hidden": MLP_HIDDEN, "dropout": 0.2,
            "members": config.mlp_members}  # fmt: skip


@dataclass
class HeadData:
    """A node's cached embeddings: every view of every train image, view 0 of the val images."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    val_paths: list[str]
    evaluated_on: str

    @classmethod
    def gather(cls, data: NodeData, feats: dict[str, torch.Tensor]) -> HeadData:
        train = [(feats[p], y) for p, y in data.train if p in feats]
        if not train:
            raise TrainError(f"node '{data.title}' has no readable training images")
        val = [(p, feats[p][0], y) for p, y in data.val if p in feats]
        evaluated_on = "val" if val else "train (no val images)"
        val = val or [(p, feats[p][0], y) for p, y in data.train if p in feats]
        return cls(
            torch.cat([f for f, _ in train]).float(), torch.cat([torch.full((len(f),), y) for f, y in train]),
            torch.stack([f for _, f, _ in val]).float(), torch.tensor([y for _, _, y in val]),
            [p for p, _, _ in val], evaluated_on,
        )  # fmt: skip


def fit_head(
    data: NodeData, feats: dict[str, torch.Tensor], stub: NodeInfo, config: TrainConfig
) -> tuple[nn.Module, Outcome, list[dict]]:
    """Train one node's head on cached embeddings; return it, its val outcome and its history.

    The head's first layer standardises embeddings with the train statistics; the rest is a
    logistic regression, a bag of MLPs, or both with their probabilities averaged (``ensemble``).
    """
    seed_everything(config.seed)
    hd = HeadData.gather(data, feats)
    head = artefacts.build_head(stub, stub.head["in_features"])
    standardize, body = head[0], head[1]
    standardize.mean.copy_(hd.x_train.mean(0))
    standardize.std.copy_(hd.x_train.std(0).clamp(min=1e-6))
    with torch.no_grad():
        hd = dataclasses.replace(hd, x_train=standardize(hd.x_train), x_val=standardize(hd.x_val))
    n, kind = len(data.classes), stub.head["type"]
    if kind == "linear":
        history, val_proba, note = _fit_linear(body[-1], hd, n, config, stub.head)
    elif kind == "mlp":
        history, val_proba, mlp_note = _fit_mlps(body, hd, n, config)
        note = f"an average of {mlp_note}" if stub.head["members"] > 1 else ""
    else:
        linear, mlps = body.branches
        _, linear_proba, linear_note = _fit_linear(linear[-1], hd, n, config, stub.head)
        history, mlp_proba, mlp_note = _fit_mlps(mlps, hd, n, config)
        val_proba = (linear_proba + mlp_proba) / 2
        note = "; ".join(filter(None, [f"a logistic regression (C={stub.head['C']}) averaged with {mlp_note}",
                                       linear_note]))  # fmt: skip
    head.eval()
    conf, pred = val_proba.max(1)
    outcome = Outcome(data.classes, hd.val_paths, hd.y_val.tolist(), pred.tolist(), conf.tolist(),
                      hd.evaluated_on, note, _mean_probability(body, hd.x_train))  # fmt: skip
    return head, outcome, history


def _mean_probability(body: nn.Module, x: torch.Tensor, chunk: int = 4096) -> list[float]:
    """The head's mean probability per class on its (standardised) training embeddings: the class mix
    it learned, which label-shift correction starts from. Not the training counts: class-weighted
    MLPs learn another mix; not val's: the split's val mix differs from train's (measured on the
    catalogue's root: Apparel 71% of train images, 33% of val's mean prediction; with val's mix EM
    collapsed)."""
    device = next(body.parameters()).device
    with torch.no_grad():
        total = sum(body(x[i : i + chunk].to(device)).float().softmax(1).sum(0).cpu() for i in range(0, len(x), chunk))
    return (total / len(x)).tolist()


C_GRID = (0.01, 0.03, 0.1, 1.0)  # inverse L2 strength, on standardised embeddings
# BLAS threads of the logistic regression (threadpoolctl). One thread fitted the 9k catalogue's root node
# in 9-11 s where two took 76-84 s on a busy 2-core CPU (docs/benchmarks.md), and nodes fitted side by side
# (JOBS=N, Ray) then never oversubscribe the cores.
LINEAR_THREADS = 1


def _fit_linear(
    layer: nn.Linear, hd: HeadData, n_classes: int, config: TrainConfig, spec: dict
) -> tuple[list[dict], torch.Tensor, str]:
    """Multinomial logistic regression (scikit-learn, L-BFGS) with its L2 strength chosen on val.

    Plain AdamW on a linear layer under-regularises these 1,280 to 1,792-dim embeddings (measured: 86% vs
    95% val accuracy on the catalogue's Footwear node), so the convex problem is solved for each C
    of a grid and the C with the lowest val log-loss wins (val accuracy often differs by a single
    image between Cs, and best-path decoding multiplies probabilities, so calibration counts); it
    is recorded in ``spec["C"]``. With ``refit`` that C is fit once more on train + val;
    the history and the returned val probabilities are those of the train-only fit. Each fit of
    the grid starts from the previous solution (the grid ascends in C), which halves the solver's
    work, and the refit starts from the chosen C's solution: 4x faster than from zero on the
    largest node, with an objective within 0.03% of the cold refit's (L-BFGS stops at a tolerance
    either way; test accuracy moved by 0-2 images, docs/benchmarks.md).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from threadpoolctl import threadpool_limits

    xt, yt, xv, yv = hd.x_train.numpy(), hd.y_train.numpy(), hd.x_val.numpy(), hd.y_val.numpy()
    labels = list(range(n_classes))
    weights = None
    if config.linear_class_weights:
        weights = class_weights(np.bincount(yt, minlength=n_classes).tolist()).numpy()  # as the MLPs: train counts
    with threadpool_limits(limits=LINEAR_THREADS, user_api="blas"):
        clf = LogisticRegression(max_iter=3000, warm_start=True)
        history, best = [], None
        for i, c in enumerate(C_GRID, start=1):
            clf.set_params(C=c).fit(xt, yt, sample_weight=None if weights is None else weights[yt])
            pv, pt = _full_proba(clf, xv, n_classes), _full_proba(clf, xt, n_classes)
            entry = {
                "epoch": i, "C": c, "train_acc": float((pt.argmax(1) == yt).mean()),
                "train_loss": float(log_loss(yt, pt, labels=labels)), "val_acc": float((pv.argmax(1) == yv).mean()),
                "val_loss": float(log_loss(yv, pv, labels=labels)), "best": False,
            }  # fmt: skip
            history.append(entry)
            if best is None or (entry["val_loss"], -entry["val_acc"]) < (best[0]["val_loss"], -best[0]["val_acc"]):
                best = (entry, copy.deepcopy(clf), pv)
        entry, clf, pv = best
        entry["best"], spec["C"] = True, entry["C"]
        if config.temperature:
            spec["temperature"] = fit_temperature(pv, yv)
            pv = tempered(pv, spec["temperature"])
        note = ""
        if config.refit and hd.evaluated_on == "val":
            note = "figures from the fit on train alone; the saved logistic regression was refit on train + val"
            y_all = np.concatenate([yt, yv])
            if len(np.unique(y_all)) != len(clf.classes_):  # a class seen in val only: no solution to start from
                clf.set_params(warm_start=False)
            clf.fit(np.concatenate([xt, xv]), y_all, sample_weight=None if weights is None else weights[y_all])
    _load_linear(layer, clf, n_classes, spec.get("temperature", 1.0))
    return history, torch.as_tensor(pv, dtype=torch.float32), note


TEMPERATURES = np.round(np.arange(0.5, 3.01, 0.1), 2)


def tempered(proba: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities whose logits are divided by ``temperature``."""
    logits = np.log(np.clip(proba, 1e-12, None)) / temperature
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def fit_temperature(proba: np.ndarray, y: np.ndarray) -> float:
    """The temperature of a grid with the lowest log-loss of ``proba``'s tempered probabilities on ``y``."""
    losses = [-np.log(np.clip(tempered(proba, t)[np.arange(len(y)), y], 1e-12, None)).mean() for t in TEMPERATURES]
    return float(TEMPERATURES[int(np.argmin(losses))])


def _full_proba(clf, x: np.ndarray, n_classes: int) -> np.ndarray:
    """predict_proba with a column for every class, also those missing from the training labels."""
    out = np.zeros((len(x), n_classes))
    out[:, clf.classes_] = clf.predict_proba(x)
    return out / out.sum(1, keepdims=True)  # exact sums for log_loss despite float32 inputs


def _load_linear(layer: nn.Linear, clf, n_classes: int, temperature: float = 1.0) -> None:
    """Copy a fitted LogisticRegression into a linear layer (the same softmax outputs; with a
    ``temperature``, those of its logits divided by it)."""
    coef = torch.as_tensor(clf.coef_, dtype=torch.float32)
    bias = torch.as_tensor(clf.intercept_, dtype=torch.float32)
    if coef.shape[0] == 1:  # binary: sigmoid(z) == softmax([-z/2, z/2])
        coef, bias = torch.cat([-coef / 2, coef / 2]), torch.cat([-bias / 2, bias / 2])
    weight = torch.zeros(n_classes, coef.shape[1])
    full_bias = torch.full((n_classes,), -1e4)  # a class never seen in training is never predicted
    weight[clf.classes_], full_bias[clf.classes_] = coef, bias
    with torch.no_grad():
        layer.weight.copy_(weight / temperature)
        layer.bias.copy_(full_bias / temperature)


def _fit_mlps(
    body: nn.Module, hd: HeadData, n_classes: int, config: TrainConfig
) -> tuple[list[dict], torch.Tensor, str]:
    """Train one MLP, or each MLP of a ``ProbabilityAverage`` with its own seed (a bag).

    A single MLP's test accuracy moves by up to a point between seeds on the catalogue benchmark;
    averaging a few removes most of that. The first member trains on train with its best val
    epoch restored; with ``refit`` the others then train on train + val for that many epochs (as
    the logistic regression is refit), so the val figures and curves are the first member's.
    """
    members = list(body.branches) if isinstance(body, artefacts.ProbabilityAverage) else [body]
    hd = _to_device(hd, resolve_device(config.device))
    history, proba = _fit_mlp(members[0], hd, n_classes, config, config.seed)
    if len(members) == 1:
        return history, proba, "an MLP"
    refit = config.refit and hd.evaluated_on == "val"
    best_epoch = max(h["epoch"] for h in history if h["best"])
    rest_data = hd
    if refit:
        rest_data = dataclasses.replace(
            hd, x_train=torch.cat([hd.x_train, hd.x_val]), y_train=torch.cat([hd.y_train, hd.y_val])
        )
    runs = [(history, proba)] + [
        _fit_mlp(m, rest_data, n_classes, config, config.seed + i, epochs=best_epoch if refit else None)
        for i, m in enumerate(members[1:], start=1)
    ]
    if refit:
        return history, proba, (
            f"{len(members)} MLPs: the figures are the first one's (train alone, best epoch {best_epoch}); "
            f"the other {len(members) - 1} trained on train + val for {best_epoch} epochs"
        )  # fmt: skip
    accs = ", ".join(f"{max(h['val_acc'] for h in hist):.4f}" for hist, _ in runs)
    proba = torch.stack([p for _, p in runs]).mean(0)
    return history, proba, f"{len(runs)} MLPs (val accuracy {accs}; the curves are the first one's)"


def _to_device(hd: HeadData, device: torch.device) -> HeadData:
    """The embeddings and labels on the device the MLPs train on (the GPU when there is one)."""
    moved = {f: getattr(hd, f).to(device) for f in ("x_train", "y_train", "x_val", "y_val")}
    return dataclasses.replace(hd, **moved)


def _fit_mlp(
    mlp: nn.Sequential, hd: HeadData, n_classes: int, config: TrainConfig, seed: int, epochs: int | None = None
) -> tuple[list[dict], torch.Tensor | None]:
    """A small MLP trained with AdamW, warm-up + cosine, label smoothing; best val epoch restored.

    It trains on the device of ``hd``'s tensors and comes back to the CPU, as do the val probabilities.
    With ``epochs`` it stops after that many epochs of the usual schedule and keeps the last
    weights, without looking at val (for a refit on train + val); the val probabilities are None.
    """
    device = hd.x_train.device
    mlp.to(device)
    counts = torch.bincount(hd.y_train, minlength=n_classes).tolist()
    weights = class_weights(counts).to(device) if config.class_weights else None
    loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=config.label_smoothing)
    eval_loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)  # unweighted, as in train.py
    resolved = config.resolved()  # --lr and weight_decay as given, else features mode's defaults
    optimizer = torch.optim.AdamW(mlp.parameters(), lr=resolved.lr, weight_decay=resolved.weight_decay)
    batch = min(MLP_BATCH, len(hd.x_train))
    steps = (len(hd.x_train) + batch - 1) // batch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(config.head_epochs * steps, int(config.warmup_epochs * steps))
    )
    generator = torch.Generator().manual_seed(seed)
    history, best, best_state = [], None, None
    for epoch in range(1, (epochs or config.head_epochs) + 1):
        mlp.train()
        order = torch.randperm(len(hd.x_train), generator=generator).to(device)  # drawn on the CPU: same order anywhere
        # Summed where they are: a .item() per step would wait for the GPU at every step.
        total = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        for idx in order.split(batch):
            logits = mlp(hd.x_train[idx])
            loss = loss_fn(logits, hd.y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.detach().double() * len(idx)
            correct += (logits.argmax(1) == hd.y_train[idx]).sum()
        entry = {"epoch": epoch, "train_loss": total.item() / len(order), "train_acc": correct.item() / len(order),
                 "lr": scheduler.get_last_lr()[0]}  # fmt: skip
        history.append(entry)
        if epochs:
            continue
        mlp.eval()
        with torch.no_grad():
            val_logits = mlp(hd.x_val)
            val_loss = eval_loss_fn(val_logits, hd.y_val).item()
            val_acc = (val_logits.argmax(1) == hd.y_val).float().mean().item()
        improved = best is None or (val_acc, -val_loss) > best
        if improved:
            best = (val_acc, -val_loss)
            best_state = {k: v.detach().clone() for k, v in mlp.state_dict().items()}
        entry.update(val_loss=val_loss, val_acc=val_acc, best=improved)
    mlp.eval()
    if epochs:
        mlp.to("cpu")
        return history, None
    mlp.load_state_dict(best_state)
    with torch.no_grad():
        proba = mlp(hd.x_val).softmax(1).cpu()
    mlp.to("cpu")
    return history, proba


# --- all nodes -----------------------------------------------------------------------------------
def features_precision(requested: str) -> str:
    """The backbone's precision in features mode: bf16 only when asked for by name (``auto``: fp32)."""
    return "bf16" if requested == "bf16" else "fp32"


def open_backbone(config: TrainConfig) -> tuple[SharedBackbone, dict]:
    """The frozen shared backbone that ``config`` asks for, and the key of its embedding store."""
    device = resolve_device(config.device)
    precision = features_precision(config.precision)
    if precision == "bf16" and not bf16_supported(device):
        log.warning("bf16 on %s without native bf16 support: expect it to be slower than fp32", device)
    try:
        weights_file = backbones.pretrained_path(config.backbone, config.weights)
        network = backbones.create(config.backbone, 0, True, weights_file)
    except (backbones.WeightsError, ValueError) as exc:
        raise TrainError(str(exc)) from None
    data = data_config_for(config)
    colour = ColourHistogram(data.mean, data.std) if config.colour_features else None
    embedder = backbones.Embedder(network, config.stage_features, colour)
    embedder.eval().to(device, memory_format=torch.channels_last)
    runtime = Runtime(device, precision == "bf16")
    backbone = SharedBackbone(config.backbone, embedder, data, runtime, config.test_flips)
    return backbone, embedding_key(backbone, file_sha256(weights_file)[:16])


def _pixels_key(backbone: SharedBackbone) -> dict:
    """What the pixels of every view depend on: the data config, the eval transform, how views are made."""
    data = backbone.data
    return {"image_size": data.image_size, "mean": list(data.mean), "std": list(data.std),
            "eval_transform": repr(backbone.transform), "views": VIEW_RECIPE}  # fmt: skip


def embedding_key(backbone: SharedBackbone, weights_id: str) -> dict:
    """Everything that changes the numbers of the backbone's part of an embedding; its store is keyed on it."""
    return {"backbone": backbone.name, "weights": weights_id, **_pixels_key(backbone),
            "precision": backbone.runtime.precision, "stage_features": backbone.embedder.stages}  # fmt: skip


def colour_key(backbone: SharedBackbone) -> dict:
    """The key of the colour histograms' store: the pixels they read, and the histogram's version."""
    return {"backbone": COLOUR_STORE, "version": COLOUR_VERSION, **_pixels_key(backbone)}


def backbone_info(backbone: SharedBackbone, key: dict, colour: bool) -> NodeInfo:
    """``<models>/backbone/node.json``: the backbone, its data config, and what else shapes its embedding.

    ``colour``: whether the stored backbone computes the colour histogram, for the heads that read it
    (this run's, or heads kept from earlier runs: each head records whether it reads it)."""
    return NodeInfo(node="(shared backbone)", classes=[], kind="backbone", mode="features",
                    backbone=backbone.name, data=backbone.data.to_dict(),
                    config={"weights_id": key["weights"], "precision": key["precision"],
                            "stage_features": key["stage_features"], "colour_features": colour,
                            "test_flips": backbone.test_flips})  # fmt: skip


def save_backbone(folder: Path, backbone: SharedBackbone, info: NodeInfo) -> None:
    artefacts.save_node(folder, info, backbone.embedder.network.state_dict(),
                        eval_transform(backbone.data), inv_normalize(backbone.data))  # fmt: skip


def _embedding(info: NodeInfo) -> dict:
    """What the input of a head without colour depends on, from a backbone's node.json (older folders: no
    stage features). The colour histogram is left out: a head reads it or not, whatever the backbone offers."""
    return {"backbone": info.backbone, "weights_id": info.config.get("weights_id"), "data": artefacts.data_config(info),
            "stage_features": info.config.get("stage_features", 0), "precision": recorded_precision(info.config),
            "test_flips": info.config.get("test_flips", False)}  # fmt: skip


def _stored_info(folder: Path) -> NodeInfo | None:
    try:
        return artefacts.read_info(folder)
    except artefacts.ArtefactError:
        return None


def _describe(embedding: dict) -> str:
    return (f"{embedding['backbone']} (weights {embedding['weights_id']}) {embedding['data'].image_size} px, "
            f"{embedding['stage_features']} stage features, {embedding['precision']}"
            + (", test flips" if embedding["test_flips"] else ""))  # fmt: skip


def kept_heads(out: Path, tree: Hierarchy, retrained: set[str]) -> list[NodeInfo]:
    """The node.json of every features-mode head in ``out`` (nodes and attributes) not in ``retrained``."""
    heads = [out / tree.folders[n] for n in tree.parents] + sorted((out / ATTRIBUTES_FOLDER).glob("*/"))
    infos = map(artefacts.features_head_info, heads)
    return [info for info in infos if info is not None and info.node not in retrained]


def refuse_to_replace_a_used_backbone(out: Path, stored: NodeInfo | None, kept: list[NodeInfo], new_info: NodeInfo
                                      ) -> None:  # fmt: skip
    """Stop before ``<out>/backbone/`` (``stored``: its node.json) changes under the ``kept`` heads that
    this run leaves in place.

    Every features-mode head reads that one backbone's embeddings; replacing it (``--node b
    --weights other.pth``) would silently change the input of every other node's head.
    """
    if stored is None:
        return  # none yet, or unreadable: no head can use it
    old, new = _embedding(stored), _embedding(new_info)
    if old != new and kept:
        names = ", ".join(repr(info.node or "root") for info in kept)
        raise TrainError(
            f"{out / 'backbone'} embeds with {_describe(old)}, and the heads of {names} were trained on it; "
            f"this run's {_describe(new)} would change their input: retrain every node with --force "
            f"(lcpn train without --node), or train into another --out"
        )


class FeaturesMode:
    """Features mode for ``runner.run_nodes``: embed what the nodes to train need, then fit a head per node."""

    def __init__(self, split_dir: Path, out: Path, config: TrainConfig) -> None:
        if not config.pretrained and config.weights is None:
            raise TrainError("features mode needs a pretrained backbone; drop --no-pretrained or use --mode finetune")
        self.split_dir, self.out, self.config = split_dir, out, config.resolved()
        self.backbone: SharedBackbone | None = None
        self.feats: dict[str, torch.Tensor] = {}

    def prepare(self, todo: list[NodeData]) -> None:
        """Embed every image the nodes to train need (stored); finished nodes cost nothing here."""
        config = self.config
        backbone, key = self.share_backbone(todo)
        tqdm.write(training_note(backbone.runtime.device, "features"))
        views = self.views(todo)
        paths = sorted(views)
        store = self.store(key)
        t0 = time.perf_counter()
        batch = config.batch_size or default_batch_size(backbone.runtime.device)
        self.feats = embed_images(paths, backbone, store, views, batch, config.workers) if paths else {}
        log.info("embeddings ready in %.1f s", time.perf_counter() - t0)
        self.backbone = backbone

    def share_backbone(self, todo: list[NodeData]) -> tuple[SharedBackbone, dict]:
        """Open the backbone and store it in ``<out>/backbone/`` unless it is there already (parallel runs)."""
        backbone, key = open_backbone(self.config)
        tree = Hierarchy.load(self.split_dir / "hierarchy.json")
        kept = kept_heads(self.out, tree, {d.node for d in todo})
        # The backbone embeds colour for this run's heads only when asked; the stored one also for kept heads.
        colour = backbone.embedder.colour is not None or any(map(artefacts.reads_colour, kept))
        info = backbone_info(backbone, key, colour)
        stored = _stored_info(self.out / "backbone")
        refuse_to_replace_a_used_backbone(self.out, stored, kept, info)
        if stored is None or _embedding(stored) != _embedding(info) or artefacts.reads_colour(stored) != colour:
            save_backbone(self.out / "backbone", backbone, info)
        return backbone, key

    def views(self, todo: list[NodeData]) -> dict[str, int]:
        """{image path: views to embed}: every view of a train image, the plain view of a val image."""
        return {p: 1 for d in todo for p, _ in d.val} | {p: self.config.views for d in todo for p, _ in d.train}

    def store(self, key: dict) -> EmbeddingStore:
        return EmbeddingStore(Path(self.config.cache) if self.config.cache else self.split_dir / "embeddings", key)

    def fit(self, data: NodeData, folder: NodeFolder) -> NodeInfo:
        backbone = self.backbone
        stub = NodeInfo(node=data.node, classes=data.classes, mode="features",
                        head=head_spec(self.config, backbone.embedder.dim))  # fmt: skip
        head, outcome, history = fit_head(data, self.feats, stub, self.config)
        return finish_node(
            folder.staging, data, self.config, {"data": backbone.data.to_dict(), "head": stub.head},
            head.state_dict(), outcome, history, eval_transform(backbone.data), inv_normalize(backbone.data),
        )  # fmt: skip
