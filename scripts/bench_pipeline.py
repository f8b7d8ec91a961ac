#!/usr/bin/env python3
"""Speed of lcpn's input pipeline on this machine, and a projection to a 1M-image catalogue on GPUs.

    python scripts/bench_pipeline.py [--data DIR] [--images 300] [--train-data dataset_example]
                                     [--backbone efficientnet-lite0] [--batch-size 32] [--workers N]
                                     [--workdir bench_pipeline_work]
                                     [--heads-split SPLIT --heads-store STORE] [--out bench_pipeline.json]

It measures, on the JPEG files of --data (the first --images of them, sorted):

costs       CPU milliseconds per image: decoding (``images.open_rgb``) and the eval transform on
            one torch thread (as in the workers), the backbone's forward pass at --batch-size
            (summed over torch's threads)
embedding   the features-mode embedding pass (``features.embed_images``: one view, a fresh store)
            through the input pipeline with --workers: images/s, and CPU ms per image (this process
            and its worker processes together)
predict     the same for features-mode ``Cascade.predict`` from the JPEG files (test flips on, the
            default: two backbone passes per image), on models trained here on the first
            --train-images of each leaf of --train-data (features mode, linear heads; prediction's
            speed does not depend on how well they learnt; split, cache and models stay in --workdir)
heads       with --heads-split/--heads-store (a split and one of its embedding stores, e.g. the 9k
            catalogue's): the root node's logistic regression (``features.fit_head``, linear head)
            fitted with sklearn's BLAS threads bounded to each of --head-threads by threadpoolctl
            (``features.LINEAR_THREADS``): wall and CPU seconds
projection  the time to embed (two views per image: plain and mirrored) and to predict 1M images
            on 1, 4 and 16 GPUs, from the per-image costs measured here and the ASSUMED figures
            of --gpu-images-per-s (one GPU's backbone throughput) and --cores-per-gpu (CPU cores
            that decode for each GPU); each GPU is fed by its own cores, so the rate per GPU is
            the smaller of the two, and the GPUs share nothing but the file system

CPU times are what to compare on a shared machine: wall-clock rates move with the other load.
The same script measures the pipeline of an older checkout (run it with that checkout first on
PYTHONPATH); --workers is then left out of the calls that do not take it.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from lcpn import fsio
from lcpn.cascade import Cascade
from lcpn.config import TrainConfig
from lcpn.embedding_store import EmbeddingStore
from lcpn.features import embed_images, fit_head, head_spec, open_backbone
from lcpn.feed import collect_images
from lcpn.hierarchy import ROOT, Hierarchy
from lcpn.images import open_rgb
from lcpn.nodes import load_node_data
from lcpn.prepare import prepare
from lcpn.sources import scan_tree
from lcpn.train import train_nodes

CATALOGUE = 1_000_000
GPU_COUNTS = (1, 4, 16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("dataset_example"), help="the JPEGs measured (a folder)")
    ap.add_argument(
        "--train-data",
        type=Path,
        default=Path("dataset_example"),
        help="a labelled folder tree to train the predict section's models on",
    )
    ap.add_argument("--train-images", type=int, default=8, help="images per leaf of --train-data trained on")
    ap.add_argument("--images", type=int, default=300, help="images measured (the first ones, sorted)")
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, help="input pipeline processes [default: lcpn's]")
    ap.add_argument("--workdir", type=Path, default=Path("bench_pipeline_work"))
    ap.add_argument("--heads-split", type=Path, help="a split folder, for the heads measurement")
    ap.add_argument("--heads-store", type=Path, help="an embedding store folder of that split")
    ap.add_argument("--head-threads", type=int, nargs="+", default=[1, 2], help="BLAS thread counts tried, in order")
    ap.add_argument(
        "--gpu-images-per-s",
        type=float,
        default=3000.0,
        help="ASSUMED backbone throughput of one GPU, images/s (issue 14's target on an H100)",
    )
    ap.add_argument("--cores-per-gpu", type=int, default=16, help="ASSUMED CPU cores decoding for each GPU")
    ap.add_argument("--skip", nargs="*", default=[], choices=["embedding", "predict"], help="sections left out")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here too")
    args = ap.parse_args()

    paths = [p for p in collect_images([args.data]) if p.lower().endswith((".jpg", ".jpeg"))][: args.images]
    config = TrainConfig(
        mode="features",
        backbone=args.backbone,
        device="cpu",
        head="linear",
        views=1,
        batch_size=args.batch_size,
        **({} if args.workers is None else {"workers": args.workers}),
    )
    backbone, key = open_backbone(config.resolved())
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"torch {torch.__version__} with {torch.get_num_threads()} threads",
        "lcpn": str(Path(inspect.getfile(Cascade)).parent), "images": len(paths), "backbone": args.backbone,
        "image_size": backbone.data.image_size, "batch_size": args.batch_size, "workers": args.workers,
        "costs_ms_per_image": costs(paths, backbone, args.batch_size),
    }  # fmt: skip
    print(json.dumps(result, indent=2), flush=True)
    if "embedding" not in args.skip:
        result["embedding"] = embedding_rate(paths, backbone, key, args)
        print(f"embedding pass: {result['embedding']}", flush=True)
    if "predict" not in args.skip:
        result["predict"] = predict_rate(paths, config, args)
        print(f"features-mode predict: {result['predict']}", flush=True)
    if args.heads_split and args.heads_store:
        result["linear_head_fits"] = head_seconds(args.heads_split, args.heads_store, args.head_threads)
        print(f"root logistic regression: {result['linear_head_fits']}", flush=True)
    result["projection"] = projection(result["costs_ms_per_image"], args.gpu_images_per_s, args.cores_per_gpu)
    print(json.dumps(result["projection"], indent=2))
    if args.out:
        fsio.write_json(args.out, result)


def costs(paths: list[str], backbone, batch_size: int) -> dict:
    """CPU milliseconds per image: decoding and the eval transform, the backbone (all its threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the pipeline's workers; idle OpenMP threads spinning would count as work
    t0 = time.process_time()
    pictures = [open_rgb(p) for p in paths]
    t1 = time.process_time()
    pixels = [backbone.transform(p) for p in pictures]
    t2 = time.process_time()
    torch.set_num_threads(threads)
    batches = [torch.stack(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)]
    backbone.runtime.run(backbone.embedder, batches[0])  # warm-up
    t3 = time.process_time()
    for x in batches:
        backbone.runtime.run(backbone.embedder, x)
    t4 = time.process_time()
    n = len(paths)
    return {"decode": 1e3 * (t1 - t0) / n, "transform": 1e3 * (t2 - t1) / n, "network": 1e3 * (t4 - t3) / n}


def timed(run, n: int) -> dict:
    """images/s of ``run()`` over ``n`` images, and its CPU ms per image with its (finished) child processes."""
    before, start = os.times(), time.perf_counter()
    run()
    after, seconds = os.times(), time.perf_counter() - start
    cpu = sum(a - b for a, b in zip(after[:4], before[:4]))  # user + system, self + children
    return {"images_per_s": round(n / seconds, 2), "cpu_ms_per_image": round(1e3 * cpu / n, 1)}


def _workers(function, args) -> dict:
    """``workers=`` for the calls that take it (an older checkout's do not)."""
    takes = "workers" in inspect.signature(function).parameters
    return {"workers": args.workers} if takes and args.workers is not None else {}


def embedding_rate(paths: list[str], backbone, key: dict, args) -> dict:
    root = args.workdir / "embedding-store"
    shutil.rmtree(root, ignore_errors=True)
    store = EmbeddingStore(root, key)
    return timed(lambda: embed_images(paths, backbone, store, 1, args.batch_size, **_workers(embed_images, args)),
                 len(paths))  # fmt: skip


def predict_rate(paths: list[str], config: TrainConfig, args) -> dict:
    split, models, train = args.workdir / "split", args.workdir / "models", args.workdir / "train"
    if not (split / "hierarchy.json").is_file():
        prepare(*scan_tree(_first_of_each_leaf(args.train_data, args.train_images, train)), split, str(train))
    train_nodes(split, models, config)  # nodes already trained on the same data and options are skipped
    cascade = Cascade.load(models, "cpu")
    return timed(lambda: list(cascade.predict(paths, args.batch_size, **_workers(cascade.predict, args))), len(paths))


def _first_of_each_leaf(data: Path, n: int, out: Path) -> Path:
    """A tree of links to the first ``n`` images of each leaf folder of ``data``."""
    for folder in sorted({Path(p).parent for p in collect_images([data])}):
        for image in collect_images([folder])[:n]:
            link = out / Path(image).relative_to(data)
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(Path(image).resolve())
    return out


def head_seconds(split: Path, store_folder: Path, thread_counts: list[int]) -> list[dict]:
    """Seconds to fit the root's logistic regression (grid + refit) with BLAS threads bounded to each count."""
    from threadpoolctl import threadpool_limits

    from lcpn import features
    from lcpn.artefacts import NodeInfo

    store = EmbeddingStore(store_folder.parent, json.loads((store_folder / "key.json").read_text()))
    assert store.folder == store_folder, "the store's key.json does not name this folder"
    sha = {r["path"]: r["sha256"] for r in fsio.read_csv(split / "images.csv")}
    data = load_node_data(split, Hierarchy.load(split / "hierarchy.json"), ROOT)
    views = {p: 1 for p, _ in data.val} | {p: 2 for p, _ in data.train}  # features mode's default views
    feats = {p: torch.from_numpy(np.stack([store[f"{sha[p]}:{v}"] for v in range(n)])) for p, n in views.items()}
    config = TrainConfig(mode="features", head="linear", device="cpu")
    dim = next(iter(feats.values())).shape[1]
    out = []
    for threads in thread_counts:
        stub = NodeInfo(node=ROOT, classes=data.classes, mode="features", head=head_spec(config, dim))
        features.LINEAR_THREADS = threads  # lcpn's own bound (a checkout without one has the outer bound only)
        with threadpool_limits(threads):
            start, cpu = time.perf_counter(), time.process_time()
            fit_head(data, feats, stub, config)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            out.append({"threads": threads, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2)})
    return out


def projection(costs_ms: dict, gpu_rate: float, cores_per_gpu: int) -> dict:
    """Hours for 1M images on 1, 4 and 16 GPUs: the slower of the GPU and the cores that feed it."""
    decode, transform = costs_ms["decode"] / 1e3, costs_ms["transform"] / 1e3
    jobs = {
        # embedding for training: two views (plain and mirrored) of each image, both through the network
        "embed_two_views": (decode + 2 * transform, gpu_rate / 2),
        # prediction with test flips: the picture and its mirror image, both through the network
        "predict_with_flips": (decode + 2 * transform, gpu_rate / 2),
    }
    out = {"assumed": {"gpu_images_per_s": gpu_rate, "cores_per_gpu": cores_per_gpu},
           "measured_here": "decode and transform costs per image on one core of this machine"}  # fmt: skip
    for name, (cpu_seconds, gpu_images_per_s) in jobs.items():
        per_gpu = min(cores_per_gpu / cpu_seconds, gpu_images_per_s)
        out[name] = {
            "bound_by": "CPU decoding" if cores_per_gpu / cpu_seconds < gpu_images_per_s else "GPU",
            "images_per_s_per_gpu": round(per_gpu),
            "minutes": {g: round(CATALOGUE / (per_gpu * g) / 60, 1) for g in GPU_COUNTS},
        }
    return out


if __name__ == "__main__":
    main()
