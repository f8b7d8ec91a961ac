"""torchrun's processes: one node fine-tuned on several GPUs with DistributedDataParallel.

``torchrun --standalone --nproc_per_node=N -m -- lcpn train --node X ...`` starts N copies of
the same command (the ``--`` keeps torchrun from reading ``--node`` as an abbreviation of its own
``--node-rank``); torchrun tells each its place through ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE``. Finetune mode then joins a process group (NCCL on CUDA, gloo on the CPU) and runs
on ``cuda:LOCAL_RANK``, or on the CPU. Every rank fits every node it is given, since DDP needs
them all for each step; rank 0 alone locks nodes, writes checkpoints and artefacts and swaps nodes
in, while the others wait for it at a barrier and then read what it wrote. Ranks other than 0
print nothing to stdout (their warnings and errors still go to stderr). With ``WORLD_SIZE`` 1, or
without torchrun, nothing here changes how a run goes. Features mode is refused under torchrun.
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable, Sized
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from .errors import LcpnError

T = TypeVar("T")
TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
# How long a rank waits for the others: ranks other than 0 wait while rank 0 alone fits the LP-FT
# probe or writes a node's report, which can take minutes on a large node (NCCL's default is 10).
WAIT = timedelta(hours=2)


class DistributedError(LcpnError):
    """A torchrun launch that lcpn cannot run."""


def launched() -> bool:
    """True in a process that torchrun started as one of several."""
    return all(v in os.environ for v in TORCHRUN_VARIABLES) and world_size() > 1


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1")) if all(v in os.environ for v in TORCHRUN_VARIABLES) else 1


def rank() -> int:
    return int(os.environ["RANK"]) if launched() else 0


def is_main() -> bool:
    """True in the process that writes: rank 0, or the only one."""
    return rank() == 0


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def start(device: torch.device) -> torch.device:
    """Under torchrun, join the process group (once) and return this rank's device; else ``device``."""
    if not launched():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise DistributedError(f"torchrun runs lcpn on CUDA GPUs or on the CPU, not on {device.type}; use --device")
    if not active():
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", timeout=WAIT, device_id=device if cuda else None)
        atexit.register(dist.destroy_process_group)
        if not is_main():  # one copy of every line: rank 0's
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (open for the life of the process)
    return device


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` under DDP when the process group is up (rank 0's weights are copied to every rank)."""
    if not active():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def barrier() -> None:
    if active():
        dist.barrier()


def all_gather(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not active():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def from_main(make: Callable[[], T]) -> T:
    """``make()`` run on rank 0 alone, its result sent to every rank (CPU tensors and plain data)."""
    if not active():
        return make()
    box = [make() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any."""
    if not active():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank: each rank's last step updated its own."""
    if active():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def train_order(rows: Sized, seed: int) -> DistributedSampler:
    """This rank's share of ``rows`` shuffled (all of them for one process): the order is made from
    ``seed`` and the epoch (``set_epoch``), so a resumed run shuffles as an uninterrupted one. The
    shares have one length: a few rows repeat when the ranks do not divide the rows evenly."""
    return DistributedSampler(rows, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed)


def shard(n: int) -> range:
    """This rank's share of ``n`` rows for evaluation: every world_size-th row, none repeated."""
    return range(rank(), n, world_size())
