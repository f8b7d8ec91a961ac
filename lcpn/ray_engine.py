"""``lcpn train --ray [ADDRESS]``: train the nodes of a split on a Ray cluster.

The driver (the process that runs ``lcpn train --ray``) checks the run (``train.plan_training``),
writes ``<out>/hierarchy.json`` once, and makes sure every machine of the cluster sees the split,
its images and the model folder: they must live on a path every worker sees (a shared file
system, or a bucket mounted at the same path on every machine), and lcpn must be installed on
every machine. In features mode the driver then stores the shared backbone once and runs the
embedding pass as a Ray Data job: the images of the nodes to train, in batches over a pool of
actors that each open the backbone once and add their shards to the same embedding store a
sequential run uses: on GPUs one actor per GPU, with the cluster's CPUs per GPU for it and its
decoding processes; without, one actor per CPU that decodes in its own process.

Then every node (and attribute) is one Ray task that runs the one node loop for that node alone
(``train.train_nodes(..., nodes=[node])`` -> ``runner.run_nodes``): finished nodes are skipped,
the node is locked, built in a staging folder and swapped in, exactly as in a sequential run; in
features mode each task finds its embeddings in the store. A task needs one GPU in finetune mode
when the cluster has GPUs, a quarter of one in features mode (its MLPs train there; four heads
share a GPU), else one CPU. A task whose worker dies (killed, out of memory, machine
lost) or that fails with anything but a user error (``LcpnError``) is retried. Node locks name the
holder's Ray node (``locks.use_cluster``), so the retry, on whatever machine it runs, takes over the
lock of a worker that died or of a machine that left the cluster (a pinned task checks the pid on
the holder's machine), removes its leftovers and, in finetune mode, resumes from its last
checkpoint. A lock whose holder is still alive is refused with its name, as in a sequential run.
"""

from __future__ import annotations

import contextlib
import io
import math
import socket
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from . import locks
from .config import TrainConfig
from .errors import LcpnError
from .features import FeaturesMode, embed_images, open_backbone
from .feed import default_batch_size
from .fsio import disk_full_as_error
from .nodes import NodeData, NodeResult, summary_line
from .runner import load_nodes, skipped
from .train import RESUME_ADVICE, TrainingPlan, plan_training, train_nodes

LOCAL = "local"  # ``--ray`` without an address: start a Ray instance on this machine
MAX_RETRIES = 3  # per node task: a fourth lost worker fails the node
EMBED_BATCH = 1024  # images per Ray Data batch at most: one store shard each
EMBED_PER_ACTOR = 256  # fewer images than this per actor do not pay for opening another backbone
FEATURES_GPU_SHARE = 0.25  # of a GPU per features-mode node task: a head's MLPs need little of one
CHECK_SECONDS = 60  # how long a lock's holder check on another machine may take before the lock counts as held


class RayError(LcpnError):
    """The cluster cannot run this training; the message says why."""


def train_on_ray(
    split_dir: str | Path,
    out: str | Path,
    config: TrainConfig,
    nodes: Iterable[str] | None = (),
    force: bool = False,
    attributes: Iterable[str] | None = None,
    address: str = LOCAL,
) -> list[NodeResult]:
    """Train what ``train.train_nodes`` would train with the same arguments, one Ray task per node.

    ``address``: ``"local"`` starts a Ray instance here, anything else is passed to ``ray.init``
    (``auto``, ``ray://host:10001``, ``host:6379``). A Ray instance that this process already
    started or joined is used as it is, and left running.
    """
    ray = _import_ray()
    plan = plan_training(Path(split_dir).resolve(), Path(out).resolve(), config, nodes, attributes)
    with disk_full_as_error(plan.out, RESUME_ADVICE):
        plan.write_index()
    task_config = plan.config  # workers start in other folders: give them absolute paths
    if task_config.cache:
        task_config = task_config.replace(cache=str(Path(task_config.cache).resolve()))
        try:  # made here, so that every machine can see it
            Path(task_config.cache).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RayError(f"cannot create the --cache folder '{task_config.cache}' ({exc.strerror})") from None
    started = not ray.is_initialized()
    if started:
        _connect(ray, address)
    try:
        data = load_nodes(plan.split_dir, plan.tree, plan.chosen, plan.attributes)
        require_visible(_shared_paths(plan, data, task_config.cache))
        todo = [d for d in data if len(d.classes) > 1 and not skipped(d, plan.out, plan.config, force)]
        if task_config.mode == "features" and todo:
            embed_on_cluster(plan, task_config, todo)
        return _run_node_tasks(plan, task_config, data, force)
    finally:
        if started:
            ray.shutdown()


def _import_ray():
    try:
        import ray
    except ModuleNotFoundError:
        raise RayError("--ray needs Ray: install it with `pip install 'lcpn[ray]'` (or 'ray[data]>=2.40')") from None
    return ray


def _connect(ray, address: str) -> None:
    try:
        if address == LOCAL:
            ray.init(address=LOCAL, include_dashboard=False)
        else:
            ray.init(address=address)
    except ConnectionError as exc:
        raise RayError(f"cannot join the Ray cluster at '{address}' ({exc}); check the address, or start the "
                       "cluster with `ray start --head` first, or use --ray alone for a Ray instance on this machine"
                       ) from None  # fmt: skip


def _shared_paths(plan: TrainingPlan, data: list[NodeData], cache: str | None) -> list[Path]:
    """What every worker must see: the split, an image of it, the model folder, and --cache if given."""
    image = next((Path(p) for d in data for p, _ in d.train), None)
    extra = [p for p in (image, Path(cache) if cache else None) if p is not None]
    return [plan.split_dir / "hierarchy.json", plan.out, *extra]


def _missing(paths: list[Path]) -> tuple[str, list[str]]:
    """On one machine: its name and the ``paths`` it cannot see."""
    return socket.gethostname(), [str(p) for p in paths if not p.exists()]


def _pinned(fn, machine: str):
    """``fn`` as a Ray task that runs on the Ray node ``machine`` and nowhere else, needing no CPU."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    strategy = NodeAffinitySchedulingStrategy(machine, soft=False)
    return ray.remote(num_cpus=0, max_retries=0)(fn).options(scheduling_strategy=strategy)


def _alive_machines() -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def require_visible(paths: list[Path]) -> None:
    """Refuse the run unless every alive machine of the cluster sees every one of ``paths``."""
    import ray

    answers = ray.get([_pinned(_missing, machine).remote(paths) for machine in sorted(_alive_machines())])
    blind = [(host, missing) for host, missing in answers if missing]
    if blind:
        host, missing = blind[0]
        raise RayError(
            f"the Ray worker on {host} cannot see '{missing[0]}': put the split, its images and --out on a path "
            f"that every machine of the cluster sees (a shared file system or a bucket mounted at the same path)"
        )


class _EmbeddingActor:
    """A Ray Data worker: opens the backbone once, then embeds batches of paths into the shared store."""

    def __init__(self, split_dir: Path, out: Path, config: TrainConfig, workers: int) -> None:
        self.backbone, key = open_backbone(config)
        self.store = FeaturesMode(split_dir, out, config).store(key)
        self.batch_size = config.batch_size or default_batch_size(self.backbone.runtime.device)
        self.workers = workers

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        views = {str(p): int(v) for p, v in zip(batch["path"], batch["views"])}
        embedded = embed_images(list(views), self.backbone, self.store, views, self.batch_size, self.workers)
        return {"embedded": np.array([len(embedded)])}


def embed_on_cluster(plan: TrainingPlan, config: TrainConfig, todo: list[NodeData]) -> None:
    """Store the backbone once and embed the images of the ``todo`` nodes with a Ray Data job."""
    import ray

    mode = FeaturesMode(plan.split_dir, plan.out, config)
    mode.share_backbone(todo)  # refuses a backbone other heads still read, before any work
    views = mode.views(todo)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    actors = min(gpus or cpus, math.ceil(len(views) / EMBED_PER_ACTOR))
    # Without GPUs Ray Data runs an actor per CPU: each decodes in its own process. A GPU's actor gets the
    # cluster's CPUs per GPU: one runs the backbone, the others decode for it (a GPU waits for decoding).
    cpus_each = max(1, cpus // gpus) if gpus else 1
    batch = min(EMBED_BATCH, math.ceil(len(views) / actors))
    start = time.perf_counter()
    items = [{"path": p, "views": v} for p, v in sorted(views.items())]
    batches = ray.data.from_items(items).map_batches(  # Ray Data restarts a lost actor and retries its batch
        _EmbeddingActor, fn_constructor_args=(plan.split_dir, plan.out, config, cpus_each - 1), batch_size=batch,
        compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=1 if gpus else 0, num_cpus=cpus_each,
    )  # fmt: skip
    embedded = sum(int(row["embedded"]) for row in batches.take_all())  # no aggregation task to wait for a CPU
    print(f"embedded {embedded} images on {actors} {'GPU' if gpus else 'CPU'} worker(s) in "
          f"{time.perf_counter() - start:.1f} s", flush=True)  # fmt: skip


class RayMachines:
    """``locks.Cluster`` on Ray: machines are Ray node ids; a holder elsewhere is checked on its own machine."""

    def machine(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def alive(self, machine: str, pid: int) -> bool:
        import ray

        if machine not in _alive_machines():
            return False  # the machine left the cluster, and the process with it
        try:
            return bool(ray.get(_pinned(locks.pid_alive, machine).remote(pid), timeout=CHECK_SECONDS))
        except (ray.exceptions.RayError, TimeoutError):
            return True  # cannot tell: refusing is safer than training a node twice at once


def _train_one(
    split_dir: Path, out: Path, config: TrainConfig, node: str | None, attribute: str | None, force: bool
) -> list[NodeResult] | LcpnError:
    """One Ray task: the node loop for one node or attribute. A user error is returned, so it is not retried."""
    locks.use_cluster(RayMachines())
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the driver prints each node's line once
            return train_nodes(split_dir, out, config, None if node is None else [node], force,
                               [] if attribute is None else [attribute], write_index=False)  # fmt: skip
    except LcpnError as exc:
        return exc


def _run_node_tasks(plan: TrainingPlan, config: TrainConfig, data: list[NodeData], force: bool) -> list[NodeResult]:
    """A task per node, a line per node as it finishes; the results in the sequential run's order."""
    import ray

    gpu = ray.cluster_resources().get("GPU", 0) > 0
    share = (1 if config.mode == "finetune" else FEATURES_GPU_SHARE) if gpu else 0
    task = ray.remote(_train_one).options(num_gpus=share, num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=True)
    names = {a.node: a.name for a in plan.attributes}
    pending = {
        task.remote(plan.split_dir, plan.out, config, None if d.node in names else d.node, names.get(d.node), force): d
        for d in data
    }
    results: dict[str, NodeResult] = {}
    failures: list[str] = []
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        title = pending.pop(ref).title
        try:
            answer = ray.get(ref)
        except ray.exceptions.RayError as exc:  # retries spent: a bug or a cluster that keeps losing workers
            answer = exc
        if isinstance(answer, Exception):
            failures.append(f"{title}: {_first_line(answer)}")
            print(f"{title}: failed: {_first_line(answer)}", flush=True)
            continue
        for result in answer:
            results[result.node] = result
            print(summary_line(result), flush=True)
    if failures:
        raise RayError(f"{len(failures)} of {len(data)} node(s) failed ({'; '.join(failures)}); "
                       "run the same command again to train them: finished nodes are kept")  # fmt: skip
    return [results[d.node] for d in data]


def _first_line(exc: BaseException) -> str:
    cause = exc.cause if hasattr(exc, "cause") and exc.cause is not None else exc
    return (str(cause).strip().splitlines() or [type(cause).__name__])[0]
