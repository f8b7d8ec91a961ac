"""Finetune over several processes on the CPU: one node fine-tuned by two torchrun processes (gloo),
killed after a checkpoint, resumed, written once by rank 0, its saved network scoring what the ranks'
gathered val figures say; and the loader's worker processes, which do not change what is learnt."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest
import torch
from conftest import FAST

from lcpn import artefacts, distributed
from lcpn.config import TrainConfig
from lcpn.fsio import read_csv
from lcpn.images import open_rgb
from lcpn.nodes import TrainError
from lcpn.train import train_nodes

EPOCHS = 3


def torchrun(split, out) -> list[str]:
    # "--" ends torchrun's own options: it would read lcpn's --node as an abbreviation of its --node-rank
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "--", "lcpn",
        "train", "--data", str(split), "--out", str(out), "--node", "b", "--mode", "finetune",
        "--backbone", "efficientnet-lite0", "--epochs", str(EPOCHS), "--patience", str(EPOCHS), *FAST,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def resumed(split, tmp_path_factory):
    """A 2-process run killed (torchrun and both ranks) once a checkpoint is written, then run again."""
    out = tmp_path_factory.mktemp("ddp")
    args = torchrun(split, out)
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = out / "b" / "checkpoint.pt"
    deadline = time.time() + 300
    while not checkpoint.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    launcher = psutil.Process(proc.pid)
    everyone = [*launcher.children(recursive=True), launcher]  # torchrun starts each rank in a session of its own
    for p in everyone:
        p.kill()
    psutil.wait_procs(everyone)
    proc.wait()
    assert checkpoint.exists(), "no checkpoint was written before the kill"
    done = torch.load(checkpoint, weights_only=True)["progress"]["epoch"]
    assert not (out / "b" / "node.json").exists()  # a killed node never looks finished
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    return out, done, rerun.stdout


def test_a_killed_two_process_run_resumes_after_its_saved_epoch_and_finishes(resumed):
    out, done, stdout = resumed
    assert 1 <= done < EPOCHS
    assert stdout.count(f"resuming after epoch {done}") == 1  # rank 0 speaks; rank 1 resumed silently
    info = artefacts.read_info(out / "b")
    assert [h["epoch"] for h in info.history] == list(range(1, EPOCHS + 1))
    assert not (out / "b" / "checkpoint.pt").exists()


def test_rank_0_writes_the_node_once_and_the_saved_network_scores_the_gathered_val_figures(split, resumed):
    out, _, _ = resumed
    info = artefacts.read_info(out / "b")
    assert info.finetune["world_size"] == 2
    assert sorted(p.name for p in (out / "b").iterdir()) == sorted(
        ["bin", "model.pth", "node.json", "performance.txt", "class_plot.png", "confusion_matrix.png",
         "error_plot.png", "wrong_plot.png"]
    )  # fmt: skip  # no staging folder, lock or checkpoint of either rank left behind
    assert sorted(p.name for p in out.iterdir()) == ["b", "hierarchy.json"]

    node = artefacts.load_node(out / "b")
    val = read_csv(split / "b" / "val.csv")
    with torch.inference_mode():
        pixels = torch.stack([node.transforms(open_rgb(row["path"])) for row in val])
        predicted = [node.encoder[i] for i in node.network(pixels).argmax(1).tolist()]
    # each rank evaluated half of val; the gathered figures are the whole set's
    assert info.metrics["n"] == len(val)
    right = sum(p == row["label"] for p, row in zip(predicted, val))
    assert info.metrics["accuracy"] == pytest.approx(right / len(val))


def test_features_mode_under_torchrun_is_refused_in_one_sentence(split, tmp_path, monkeypatch):
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    assert distributed.launched() and distributed.world_size() == 2
    config = TrainConfig(mode="features", backbone="efficientnet-lite0", image_size=32, device="cpu")
    with pytest.raises(TrainError, match="finetune mode only"):
        train_nodes(split, tmp_path / "m", config, nodes=["b"])
    assert not (tmp_path / "m").exists()


def test_training_views_do_not_depend_on_the_loader_worker_processes(split, tmp_path):
    config = TrainConfig(backbone="efficientnet-lite0", image_size=32, epochs=2, patience=5, batch_size=8, device="cpu")
    for workers in (0, 2):  # 2: persistent workers, each view seeded by (seed, epoch, image)
        train_nodes(split, tmp_path / str(workers), config.replace(workers=workers), nodes=["b"])
    alone, workers = (torch.load(tmp_path / m / "b" / "model.pth", weights_only=True) for m in ("0", "2"))
    assert all(torch.equal(alone[k], workers[k]) for k in alone)
