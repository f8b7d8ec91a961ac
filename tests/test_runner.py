import errno
import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from lcpn import artefacts, fsio, runner
from lcpn.cli import main
from lcpn.config import TrainConfig
from lcpn.hierarchy import Hierarchy
from lcpn.locks import LOCK_FILE, LockHeldError
from lcpn.nodes import finish_node, is_finished
from lcpn.report import Outcome
from lcpn.train import train_nodes

FINETUNE = TrainConfig(backbone="efficientnet-lite0", image_size=32, epochs=1, batch_size=8, workers=0, device="cpu")


class RecordingMode:
    """A mode that fits nothing: each node gets a tiny state dict and a report."""

    def __init__(self):
        self.prepared, self.fitted = [], []

    def prepare(self, todo):
        self.prepared.append([d.node for d in todo])

    def fit(self, data, folder):
        self.fitted.append(data.node)
        y = [label for _, label in data.val]
        outcome = Outcome(data.classes, [p for p, _ in data.val], y, y, [1.0] * len(y))
        return finish_node(folder.staging, data, FINETUNE, {}, {"w": torch.zeros(2)}, outcome, [])


def run_all(split, out, mode, force=False, nodes=None):
    tree = Hierarchy.load(split / "hierarchy.json")
    return runner.run_nodes(split, out, tree, nodes or tree.parents, FINETUNE, mode, force)


def test_finished_nodes_are_skipped_before_the_mode_prepares(split, tmp_path):
    first = RecordingMode()
    results = run_all(split, tmp_path, first)
    assert first.prepared == [["", "a", "b", "a/x"]]  # the constant node c is never prepared for
    assert [r.status for r in results] == ["trained", "trained", "trained", "constant", "trained"]
    again = RecordingMode()
    results = run_all(split, tmp_path, again)
    assert again.prepared == [] and again.fitted == []
    assert [r.status for r in results] == ["skipped", "skipped", "skipped", "constant", "skipped"]
    forced = RecordingMode()
    run_all(split, tmp_path, forced, force=True, nodes=["b"])
    assert forced.prepared == [["b"]]
    assert not list(tmp_path.rglob(LOCK_FILE))


def test_features_mode_hashes_and_embeds_nothing_when_its_nodes_are_finished(split, tmp_path, monkeypatch):
    from lcpn import features

    config = TrainConfig(mode="features", backbone="efficientnet-lite0", image_size=32, device="cpu", views=1,
                         head="linear", cache=str(tmp_path / "cache"))  # fmt: skip
    train_nodes(split, tmp_path / "m", config, nodes=["b"])

    def forbidden(*args, **kwargs):
        raise AssertionError("expensive work for a finished node")

    monkeypatch.setattr(features, "open_backbone", forbidden)
    monkeypatch.setattr(features, "file_sha256", forbidden)
    assert [r.status for r in train_nodes(split, tmp_path / "m", config, nodes=["b"])] == ["skipped"]


@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_node_locked_by_a_live_run_is_refused_and_a_dead_runs_lock_is_taken_over(split, tmp_path, live_pid):
    import socket

    lock = tmp_path / "b" / LOCK_FILE
    lock.parent.mkdir()
    lock.write_text(json.dumps({"pid": live_pid.pid, "host": socket.gethostname(), "since": "2024-01-01 10:00:00"}))
    mode = RecordingMode()
    with pytest.raises(LockHeldError, match=f"node b is being trained by pid {live_pid.pid} on .* since 2024-01-01"):
        run_all(split, tmp_path, mode)
    assert mode.prepared == [] and lock.exists()
    assert not (tmp_path / "parent" / LOCK_FILE).exists()  # the locks taken before the refusal are released
    live_pid.kill()
    live_pid.wait()
    run_all(split, tmp_path, mode, nodes=["b"])
    assert mode.fitted == ["b"] and not lock.exists()


class LockReadingMode(RecordingMode):
    """Records the lock each node holds while it is fitted."""

    def __init__(self):
        super().__init__()
        self.locks = []

    def fit(self, data, folder):
        self.locks.append(json.loads((folder.final / LOCK_FILE).read_text()))
        return super().fit(data, folder)


class Machines:
    """A cluster engine's answers about the machines of a lock's holders (``locks.Cluster``)."""

    def __init__(self, holder_alive: bool):
        self.holder_alive, self.asked = holder_alive, []

    def machine(self):
        return "machine-here"

    def alive(self, machine, pid):
        self.asked.append((machine, pid))
        return self.holder_alive


def test_a_lock_from_another_machine_is_taken_over_only_when_the_cluster_says_its_holder_is_gone(
    split, tmp_path, monkeypatch
):
    from lcpn import locks

    monkeypatch.setattr(locks, "_cluster", None)  # restored after the test
    lock = tmp_path / "b" / LOCK_FILE
    lock.parent.mkdir()
    lock.write_text(json.dumps({"pid": 4242, "host": "elsewhere", "since": "2024-01-01 10:00:00",
                                "machine": "machine-gone"}))  # fmt: skip
    with pytest.raises(LockHeldError, match="pid 4242 on elsewhere"):  # no cluster: cannot tell from here
        run_all(split, tmp_path, RecordingMode(), nodes=["b"])
    for alive in (True, False):
        machines = Machines(alive)
        locks.use_cluster(machines)
        mode = LockReadingMode()
        if alive:
            with pytest.raises(LockHeldError, match="pid 4242 on elsewhere"):
                run_all(split, tmp_path, mode, nodes=["b"])
            assert lock.exists() and mode.fitted == []
        else:
            run_all(split, tmp_path, mode, nodes=["b"])
            assert mode.fitted == ["b"] and not lock.exists()
            assert mode.locks[0]["machine"] == "machine-here" and mode.locks[0]["pid"] == os.getpid()  # this run's
        assert machines.asked == [("machine-gone", 4242)]


def test_leftovers_of_a_killed_run_are_cleaned_at_start(split, tmp_path):
    node = tmp_path / "b"
    leftovers = [node / ".checkpoint.pt.k2j3.tmp", node / "bin" / ".encoder.pickle.x1.tmp"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    (node / ".staging-4242.tmp" / "bin").mkdir(parents=True)
    run_all(split, tmp_path, RecordingMode(), nodes=["b"])
    assert not [p for p in node.rglob(".*") if p.name != LOCK_FILE]


def test_a_kill_while_swapping_in_leaves_an_unfinished_node(split, tmp_path, monkeypatch):
    run_all(split, tmp_path, RecordingMode(), nodes=["b"])
    real_replace = os.replace
    moved = []

    def killed_after_two(src, dst):
        if os.path.dirname(dst) == str(tmp_path / "b"):  # swapping in, not writing into the temporary folder
            if len(moved) == 2:
                raise KeyboardInterrupt
            moved.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(runner.os, "replace", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_all(split, tmp_path, RecordingMode(), force=True, nodes=["b"])
    assert moved and not (tmp_path / "b" / "node.json").exists()  # retrained by the next run, never "finished"
    monkeypatch.setattr(runner.os, "replace", real_replace)
    mode = RecordingMode()
    run_all(split, tmp_path, mode, nodes=["b"])
    assert mode.fitted == ["b"] and not list((tmp_path / "b").glob(".*.tmp"))


def test_a_failed_retrain_leaves_the_old_node_whole(split, tmp_path, monkeypatch):
    out = tmp_path / "m"
    train_nodes(split, out, FINETUNE, nodes=["b"])
    before = {p.name: p.read_bytes() for p in (out / "b").iterdir() if p.is_file()}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # after the new report was written, before the weights and node.json

    monkeypatch.setattr(artefacts, "save_node", killed)
    with pytest.raises(KeyboardInterrupt):
        train_nodes(split, out, FINETUNE.replace(seed=1), nodes=["b"])
    after = {p.name: p.read_bytes() for p in (out / "b").iterdir() if p.is_file() and p.name != "checkpoint.pt"}
    assert after == before
    data_hash = artefacts.read_info(out / "b").data_hash
    assert is_finished(out / "b", data_hash, FINETUNE)
    assert not is_finished(out / "b", data_hash, FINETUNE.replace(seed=1))


def test_a_full_disk_ends_in_one_sentence_naming_the_folder(split, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fsio, "write_bytes", full)
    out = tmp_path / "m"
    args = ["train", "--data", split, "--out", out, "--node", "b", "--backbone", "efficientnet-lite0", "--epochs", "1",
            "--image-size", "32", "--batch-size", "8", "--workers", "0", "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert f"no space left on the disk that holds '{out}'; free some space and run" in result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    assert not (out / "b" / "node.json").exists()
