"""Finetune mode: fit a whole network per parent node, resumably.

Recipe: AdamW with a linear warm-up then cosine decay (per step), label smoothing, augmentation
that starts from the eval square (``transforms.train_transform``), class-weighted cross-entropy
against imbalance (``recipe.class_weights``), early stopping on validation accuracy with the best
weights restored, channels_last, and ``--precision``: auto is mixed precision on CUDA (bf16 where
the GPU supports it, else fp16 with loss scaling) and fp32 elsewhere; fp32 turns it off; bf16 is
bf16 autocast on any device.

Two recipes keep the pretrained features that make a network hold on new photos:

- LP-FT (``--init-head probe``; Kumar et al., ICLR 2022): the classification layer starts as the
  node's linear probe, a logistic regression on the pretrained network's pooled final features
  (``features.fit_head``, L2 strength chosen on val, not refit on val), so the first steps do not
  push a random layer's large gradients into the backbone.
- WiSE-FT (``--wise-ft``; Wortsman et al., CVPR 2022): after fine-tuning, the weights
  ``(1 - a) * start + a * fine-tuned`` (BatchNorm statistics included) are scored on val for every
  ``a`` in ``WISE_ALPHAS``; the best accuracy wins (ties: the lower val loss, then the smaller ``a``).
  ``start`` is the pretrained network with the layer it started from.
- ``--freeze-bn``: BatchNorm layers run in eval mode while the network trains, so they keep the
  pretrained running statistics (their scale and shift still learn). A probe was fitted on
  features normalised by those statistics; a batch of 16's own statistics move them, and the
  probe's large weights turn that into huge logits (LP-FT's first epoch on the CPU subset: train
  loss 4.05 on 3 classes without it, 0.58 with it; docs/benchmarks.md).

node.json's ``finetune`` records the probe's figures and every mix's val accuracy and loss.

Resume: after every epoch a checkpoint is written atomically into the node's folder: model,
optimizer, scheduler, loss scaler, history, best weights, and every random state (Python, NumPy,
torch CPU and CUDA, and the generator that seeds the loader's workers).
A killed run started again continues after the last finished epoch exactly as if it had never
stopped: on a CPU its final weights equal an uninterrupted run's bit for bit. The probe's layer
is in the checkpoint too, and the pretrained weights are read again, so WiSE-FT's start is the
same after a kill.

Input pipeline: images are decoded and transformed in ``--workers`` processes that live across
epochs (``persistent_workers``), each preparing ``PREFETCH_BATCHES`` batches ahead, into pinned
memory on CUDA, copied to the GPU with ``non_blocking=True``. Every random view is drawn from a seed
of its own (the run's seed, the epoch and the row), so the views do not depend on which worker
process or rank opens an image, and a resumed run sees the views an uninterrupted one would. An
unreadable image is logged with its reason and dropped from its batch; a batch with none left is
skipped.

Several GPUs (``torchrun --nproc_per_node=N``, see ``distributed``): the node's network runs under
DistributedDataParallel, gradients averaged over the ranks each step. ``--batch-size`` is per
process, so a step sees N times as many images. ``DistributedSampler`` deals each rank its share of
the shuffled train rows (seeded by ``--seed`` and the epoch: the same order in every run); val rows
are shared out without repeats and the ranks' results gathered, so every figure is the whole val
set's and every rank takes the same early-stopping and WiSE-FT decisions. Rank 0 alone fits the
LP-FT probe (sent to the others), writes the checkpoints and the node; on resume every rank reads
the same checkpoint, whose key holds the number of processes (a different number starts the node
over: its steps per epoch differ). BatchNorm statistics are each rank's own during an epoch and
rank 0's for evaluation and saving.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from . import backbones, distributed, features, fsio
from .artefacts import NodeInfo
from .config import TrainConfig
from .devices import resolve_device, training_note
from .feed import default_workers
from .images import ImageError, open_rgb
from .nodes import NodeData, TrainError, finish_node
from .recipe import class_weights, data_config_for, seed_everything, warmup_cosine
from .report import Outcome
from .runner import NodeFolder
from .transforms import DataConfig, eval_transform, inv_normalize, train_transform

log = logging.getLogger(__name__)

WISE_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)  # WiSE-FT: the share of the fine-tuned weights in each mix tried
PREFETCH_BATCHES = 4  # per worker process: decoding stalls (a large JPEG) do not starve a GPU


class FinetuneMode:
    """Finetune mode for ``runner.run_nodes``: nothing to prepare but the device; a network per node."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config.resolved()
        self.device = distributed.start(resolve_device(config.device))

    def prepare(self, todo: list[NodeData]) -> None:
        tqdm.write(training_note(self.device, "finetune"))

    def fit(self, data: NodeData, folder: NodeFolder) -> NodeInfo | None:
        return fit_node(data, folder, self.config, self.device)


# --- data ------------------------------------------------------------------------------------------
class ImageDataset(Dataset):
    """(path, label) rows opened safely; an unreadable file yields None and is dropped in batching.

    Items are asked for as (row, seed) (``ViewSeeds``): the transform's random draws come from the seed.
    """

    def __init__(self, rows: list[tuple[str, int]], transform: Callable) -> None:
        self.rows, self.transform = rows, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: tuple[int, int]):
        i, seed = item
        path, label = self.rows[i]
        try:
            with torch.random.fork_rng(devices=[]):  # the process's own random state is left as it was
                torch.manual_seed(seed)
                return self.transform(open_rgb(path)), label, i
        except ImageError as exc:
            log.warning("skipping %s: %s", path, exc)
            return None


class ViewSeeds(Sampler):
    """The rows of ``order`` as (row, seed) pairs, the seed made from the run's seed, the epoch and the row."""

    def __init__(self, order, seed: int) -> None:
        self.order, self.seed, self.epoch = order, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.order, "set_epoch"):  # DistributedSampler: a new shuffle
            self.order.set_epoch(epoch)

    def __iter__(self):
        for row in self.order:
            yield row, int(np.random.SeedSequence([self.seed, self.epoch, row]).generate_state(1)[0])

    def __len__(self) -> int:
        return len(self.order)


def collate_skip_bad(batch: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    xs, ys, idx = zip(*batch)
    return torch.stack(xs), torch.tensor(ys), torch.tensor(idx)


def _loader(rows, transform, config: TrainConfig, order, device: torch.device, generator) -> DataLoader:
    """Batches of ``rows`` in ``order`` (an iterable of row numbers); ``generator`` seeds the worker processes."""
    workers = default_workers() if config.workers is None else config.workers
    return DataLoader(
        ImageDataset(rows, transform), batch_size=config.batch_size, sampler=ViewSeeds(order, config.seed),
        generator=generator, num_workers=workers, collate_fn=collate_skip_bad, pin_memory=device.type == "cuda",
        persistent_workers=workers > 0, prefetch_factor=PREFETCH_BATCHES if workers > 0 else None,
    )  # fmt: skip


# --- precision -------------------------------------------------------------------------------------
class MixedPrecision:
    """Autocast and loss scaling as ``--precision`` asks (see the module docstring)."""

    def __init__(self, precision: str, device: torch.device) -> None:
        self.device = device
        if precision == "auto":
            self.enabled = device.type == "cuda"
            self.dtype = torch.bfloat16 if self.enabled and torch.cuda.is_bf16_supported() else torch.float16
        else:
            self.enabled, self.dtype = precision == "bf16", torch.bfloat16
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.enabled and self.dtype == torch.float16)

    def autocast(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


# --- the state a checkpoint holds ------------------------------------------------------------------
@dataclass
class Progress:
    """Where a node's training stands after an epoch."""

    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best: list[float] | None = None  # (val accuracy, -val loss) of the best epoch
    best_state: dict | None = None  # its weights, on the CPU
    bad_epochs: int = 0  # epochs since the best one
    start_head: dict | None = None  # LP-FT: the probe's classification layer, on the CPU
    probe: dict | None = None  # LP-FT: the probe's L2 strength and val figures


@dataclass
class Training:
    """Everything a node's training changes as it goes; ``save`` and ``restore`` keep all of it."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    generator: torch.Generator  # seeds the loader's workers, off the global random state that dropout draws from
    device: torch.device
    progress: Progress = field(default_factory=Progress)

    def save(self, path: Path, key: dict) -> None:
        checkpoint = {
            "key": key,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": vars(self.progress),
            "random": self._random_state(),
        }
        # through a Python file object, so a full disk raises OSError(ENOSPC), not a C++ stream error
        with fsio.atomic_path(path) as tmp, open(tmp, "wb") as fh:
            torch.save(checkpoint, fh)

    def restore(self, path: Path, key: dict) -> bool:
        """Continue from the checkpoint at ``path`` if it was made with ``key``; False when there is none."""
        if not path.is_file():
            return False
        # On the CPU whatever the device: the RNG states must stay CPU tensors; the model's and the
        # optimizer's load_state_dict copy their tensors to the parameters' device.
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a checkpoint cut short by a full disk, or from an older version
            log.warning("ignoring the unreadable checkpoint %s (%s)", path, str(exc).splitlines()[0])
            return False
        if checkpoint.get("key") != key or "random" not in checkpoint:
            log.info("ignoring a checkpoint made with other data or options: %s", path)
            return False
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint["scaler"]:  # empty when loss scaling is off
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.progress = Progress(**checkpoint["progress"])
        self._set_random_state(checkpoint["random"])
        return True

    def _random_state(self) -> dict:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        return {
            "python": random.getstate(), "numpy": (name, keys.tolist(), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(), "loader": self.generator.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
        }  # fmt: skip

    def _set_random_state(self, saved: dict) -> None:
        random.setstate(saved["python"])
        name, keys, pos, has_gauss, gauss = saved["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(saved["torch"])
        self.generator.set_state(saved["loader"])
        if saved["cuda"] and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(saved["cuda"])


# --- one node --------------------------------------------------------------------------------------
def _run_epoch(
    model, loader, device, amp: MixedPrecision, loss_fn, optimizer=None, scheduler=None, desc="", freeze_bn=False
) -> dict:
    """One pass; trains when an optimizer is given (BatchNorm in eval mode with ``freeze_bn``).
    Returns loss, accuracy and the predictions."""
    training = optimizer is not None
    model.train(training)
    if training and freeze_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    total_loss, correct, seen = 0.0, 0, 0
    indices, preds, confs = [], [], []
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True,
               disable=None if distributed.is_main() else True)  # fmt: skip
    with torch.set_grad_enabled(training):
        for batch in bar:
            skip = batch is None  # every image of the batch was unreadable
            if training:  # under DDP every rank takes each step, or none does
                skip = distributed.any_rank(skip, device)
            if skip:
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
    return {"loss": total_loss / seen, "acc": correct / seen, "indices": indices, "preds": preds, "confs": confs}


def _merged(result: dict) -> dict:
    """The result of a pass over every rank's share of the rows, the same on every rank; rows in order."""
    parts = [r for r in distributed.all_gather(result) if r["indices"]]
    if len(parts) <= 1:
        return parts[0] if parts else result
    counts = [len(r["indices"]) for r in parts]
    seen = sum(counts)
    rows = sorted(zip(*([x for r in parts for x in r[k]] for k in ("indices", "preds", "confs"))))
    indices, preds, confs = (list(column) for column in zip(*rows))
    return {
        "loss": sum(r["loss"] * n for r, n in zip(parts, counts)) / seen,
        "acc": sum(r["acc"] * n for r, n in zip(parts, counts)) / seen,
        "indices": indices, "preds": preds, "confs": confs,
    }  # fmt: skip


def fit_probe(
    model: nn.Module, data: NodeData, dcfg: DataConfig, config: TrainConfig, device: torch.device, amp: MixedPrecision
) -> tuple[dict, dict]:
    """LP-FT's first step: a logistic regression on ``model``'s pooled final features of the node's
    images, folded into the network's ``_fc`` layer. Returns that layer's state and the probe's figures.

    The features are the ones ``_fc`` reads (the pooled output of the last convolution), from the
    eval transform; the probe is ``features.fit_head``'s linear head, its L2 strength chosen on val
    and not refit on val, which stays the honest yardstick for early stopping and WiSE-FT.
    """
    embedder = backbones.Embedder(model).eval()
    rows = data.train + data.val
    # its own generator: the training run's random states are as they would be without the probe
    loader = _loader(rows, eval_transform(dcfg), config, range(len(rows)), device,
                     torch.Generator().manual_seed(config.seed))  # fmt: skip
    feats = {}
    with torch.inference_mode(), amp.autocast():
        for batch in tqdm(loader, desc=f"{data.title} probe features", unit="batch", leave=False, disable=None):
            if batch is None:
                continue
            x, _, idx = batch
            out = embedder(x.to(device).contiguous(memory_format=torch.channels_last)).float().cpu()
            feats.update((rows[i][0], f[None]) for i, f in zip(idx.tolist(), out))
    stub = NodeInfo(node=data.node, classes=data.classes, mode="features",
                    head={"type": "linear", "in_features": embedder.dim})  # fmt: skip
    head, _, history = features.fit_head(data, feats, stub, config.replace(refit=False))
    standardize, linear = head[0], head[1][-1]
    # linear((x - mean) / std) as one layer on x
    weight = (linear.weight / standardize.std).detach()
    bias = (linear.bias - weight @ standardize.mean).detach()
    best = next(h for h in history if h["best"])
    return {"_fc.weight": weight, "_fc.bias": bias}, {k: best[k] for k in ("C", "val_acc", "val_loss")}


def mix_weights(start: dict, finetuned: dict, alpha: float) -> dict:
    """WiSE-FT's ``(1 - alpha) * start + alpha * finetuned`` of every float tensor (BatchNorm's running
    statistics too); integer counters come from ``finetuned``. ``lerp`` gives either end exactly."""
    return {k: torch.lerp(start[k], v, alpha) if v.is_floating_point() else v for k, v in finetuned.items()}


def _wise_ft(model, start: dict, finetuned: dict, evaluate: Callable[[float], dict]) -> tuple[float, dict, list]:
    """Score every mix of ``WISE_ALPHAS`` with ``evaluate``; return the best alpha, its result and the figures."""
    best, figures = None, []
    for alpha in WISE_ALPHAS:
        model.load_state_dict(mix_weights(start, finetuned, alpha))
        ev = evaluate(alpha)
        figures.append({"alpha": alpha, "val_acc": ev["acc"], "val_loss": ev["loss"]})
        if best is None or (ev["acc"], -ev["loss"]) > (best[1]["acc"], -best[1]["loss"]):
            best = (alpha, ev)
    return best[0], best[1], figures


def fit_node(data: NodeData, folder: NodeFolder, config: TrainConfig, device: torch.device) -> NodeInfo | None:
    """Train one node, resuming from its checkpoint if one fits; finish it in ``folder.staging``.

    Under torchrun every rank calls this; rank 0 alone writes, the others return None.
    """
    seed_everything(config.seed)
    dcfg = data_config_for(config)
    try:
        model = backbones.create(config.backbone, len(data.classes), config.pretrained, config.weights)
    except backbones.WeightsError as exc:
        raise TrainError(str(exc)) from None
    # WiSE-FT's start, less the probe's layer (restored from the checkpoint on resume)
    pretrained = {k: v.detach().clone() for k, v in model.state_dict().items()} if config.wise_ft else {}
    model = model.to(device, memory_format=torch.channels_last)
    amp = MixedPrecision(config.precision, device)
    generator = torch.Generator().manual_seed(config.seed)
    train_order = distributed.train_order(data.train, config.seed)
    train_loader = _loader(data.train, train_transform(dcfg, config.augment), config, train_order, device, generator)
    val_rows = data.val or data.train
    evaluated_on = "val" if data.val else "train (no val images)"
    val_loader = _loader(val_rows, eval_transform(dcfg), config, distributed.shard(len(val_rows)), device, generator)

    def evaluate(desc: str) -> dict:
        distributed.sync_buffers(model)
        return _merged(_run_epoch(model, val_loader, device, amp, eval_loss_fn, desc=desc))

    weights = class_weights(data.counts()["train"]).to(device) if config.class_weights else None
    loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=config.label_smoothing)
    # Val loss unweighted: it measures the model, and a class missing from train has weight 0.
    eval_loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = max(1, len(train_loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(config.epochs * steps, int(config.warmup_epochs * steps))
    )
    run = Training(model, optimizer, scheduler, amp.scaler, generator, device)
    world = distributed.world_size()
    key = {"data_hash": data.data_hash, "training_key": config.training_key(), "world_size": world}
    if run.restore(folder.checkpoint, key):
        tqdm.write(f"{data.title}: resuming after epoch {run.progress.epoch}")
    elif config.init_head == "probe":
        head, run.progress.probe = distributed.from_main(lambda: fit_probe(model, data, dcfg, config, device, amp))
        run.progress.start_head = {k: v.cpu() for k, v in head.items()}
        model.load_state_dict(head, strict=False)
        tqdm.write(f"{data.title}: starting from a linear probe (C={run.progress.probe['C']}, "
                   f"val accuracy {run.progress.probe['val_acc']:.3f})")  # fmt: skip

    net = distributed.wrap(model, device)  # after the restore: DDP starts every rank from rank 0's weights
    p = run.progress
    for epoch in range(p.epoch + 1, config.epochs + 1):
        if p.bad_epochs >= config.patience:
            break
        t0 = time.perf_counter()
        train_loader.sampler.set_epoch(epoch)
        desc = f"{data.title} epoch {epoch}/{config.epochs}"
        tr = _merged(_run_epoch(net, train_loader, device, amp, loss_fn, optimizer, scheduler,
                                desc=desc, freeze_bn=config.freeze_bn))  # fmt: skip
        ev = evaluate(f"{data.title} eval")
        score = [ev["acc"], -ev["loss"]]
        improved = p.best is None or score > p.best
        if improved:
            p.best, p.bad_epochs = score, 0
            p.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            p.bad_epochs += 1
        p.history.append({
            "epoch": epoch, "train_loss": tr["loss"], "train_acc": tr["acc"], "val_loss": ev["loss"],
            "val_acc": ev["acc"], "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - t0,
            "best": improved,
        })  # fmt: skip
        p.epoch = epoch
        tqdm.write(
            f"{data.title} epoch {epoch}: train loss {tr['loss']:.4f} acc {tr['acc']:.3f} | "
            f"{evaluated_on.split()[0]} loss {ev['loss']:.4f} acc {ev['acc']:.3f}" + (" *" if improved else "")
        )
        if distributed.is_main():
            run.save(folder.checkpoint, key)

    recipe = {"init_head": config.init_head, **({"probe": p.probe} if p.probe else {})}
    if world > 1:
        recipe["world_size"] = world
    saved, note = p.best_state, ""
    if config.wise_ft:
        start = {**pretrained, **(p.start_head or {})}
        alpha, final, figures = _wise_ft(model, start, p.best_state, lambda a: evaluate(f"{data.title} WiSE-FT {a:g}"))
        saved = mix_weights(start, p.best_state, alpha)
        recipe["wise_ft"] = {"alpha": alpha, "mixes": figures}
        tried = ", ".join(f"{f['alpha']:g}: {f['val_acc']:.4f}" for f in figures)
        note = f"WiSE-FT kept {alpha:g} x fine-tuned + {1 - alpha:g} x start weights ({evaluated_on} accuracy {tried})"
        tqdm.write(f"{data.title}: {note}")
    else:
        model.load_state_dict(p.best_state)
        final = evaluate(f"{data.title} final eval")
    if not distributed.is_main():
        return None
    seen = final["indices"]  # the val loader is not shuffled: rows in order, unreadable ones skipped
    outcome = Outcome(
        classes=data.classes, paths=[val_rows[i][0] for i in seen], y_true=[val_rows[i][1] for i in seen],
        y_pred=final["preds"], confidence=final["confs"], evaluated_on=evaluated_on, note=note,
    )  # fmt: skip
    return finish_node(
        folder.staging, data, config, {"data": dcfg.to_dict(), "finetune": recipe},
        saved, outcome, p.history, eval_transform(dcfg), inv_normalize(dcfg),
    )  # fmt: skip
