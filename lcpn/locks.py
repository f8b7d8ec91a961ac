"""One trainer per node: a lock file that names its holder.

The lock is created with ``O_EXCL``, so of two runs into the same model folder only one trains a
node; the other is refused with the holder's pid, host and start time. A lock left by a process
that has died on this host (killed, machine slept) is taken over. One from another host cannot be
checked from here, unless a cluster engine is in use (``use_cluster``: Ray's tasks): the lock then
names the holder's machine as the cluster knows it, and the cluster answers whether that machine is
still in it and the process still alive there, so a lost worker's or a lost machine's node is
taken over by its retry wherever it runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .errors import LcpnError

LOCK_FILE = ".train.lock"


class LockHeldError(LcpnError):
    """Another live run holds the lock."""


class Cluster(Protocol):
    """What a cluster engine tells the locks: this process's machine, and whether a holder elsewhere lives."""

    def machine(self) -> str: ...

    def alive(self, machine: str, pid: int) -> bool: ...


_cluster: Cluster | None = None


def use_cluster(cluster: Cluster | None) -> None:
    """Name machines in locks, and check holders on other machines, through ``cluster`` (None: no cluster)."""
    global _cluster
    _cluster = cluster


@dataclass
class NodeLock:
    path: Path

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


def acquire(folder: Path, title: str) -> NodeLock:
    """Lock ``folder`` for this process, taking over a stale lock; LockHeldError when held."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    if _cluster is not None:
        me["machine"] = _cluster.machine()
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read(path)
            if holder is not None and _alive(holder):
                raise LockHeldError(
                    f"node {title} is being trained by pid {holder['pid']} on {holder['host']} since "
                    f"{holder['since']}; wait for it to finish, or delete '{path}' if that process is gone"
                ) from None
            _take_over(path, holder)
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        return NodeLock(path)
    raise LockHeldError(f"node {title}: other runs keep taking its lock '{path}'; start one run at a time")


def _read(path: Path) -> dict | None:
    """The holder, or None when the lock is gone or was left empty by a run killed as it wrote it."""
    for attempt in range(2):
        try:
            holder = json.loads(path.read_text(encoding="utf-8"))
            read = {"pid": int(holder["pid"]), "host": str(holder["host"]), "since": str(holder["since"])}
            return read | ({"machine": str(holder["machine"])} if "machine" in holder else {})
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            if attempt == 0:
                time.sleep(0.2)  # the holder may be between creating the file and writing it
    return None


def _alive(holder: dict) -> bool:
    if holder["host"] != socket.gethostname():
        if _cluster is not None and "machine" in holder:
            return _cluster.alive(holder["machine"], holder["pid"])
        return True  # cannot tell from here
    return pid_alive(holder["pid"])


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine is alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _take_over(path: Path, seen: dict | None) -> None:
    """Remove the stale lock ``seen``, unless another run replaced it since it was read."""
    grabbed = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # a stale temporary if killed here
    try:
        os.rename(path, grabbed)
    except FileNotFoundError:
        return  # another run removed it first
    if _read(grabbed) != seen:  # a live run's fresh lock: put it back
        with contextlib.suppress(FileExistsError, FileNotFoundError):
            os.link(grabbed, path)
    grabbed.unlink(missing_ok=True)
