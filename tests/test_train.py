import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
import urllib.error
import warnings

import pytest
import torch
from click.testing import CliRunner
from conftest import FAST

from lcpn import artefacts, backbones, finetune
from lcpn.cli import main
from lcpn.config import TrainConfig
from lcpn.fsio import read_csv
from lcpn.images import open_rgb
from lcpn.recipe import class_weights
from lcpn.train import train_nodes

LITE = TrainConfig(backbone="efficientnet-lite0", image_size=32, epochs=1, batch_size=8, workers=0, device="cpu")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_whole_tree_trains_on_cpu_and_writes_every_artefact(split, tmp_path):
    out = tmp_path / "models"
    result = run("train", "--data", split, "--out", out, "--backbone", "efficientnet-lite0", "--epochs", "2", *FAST)
    assert result.exit_code == 0, result.output
    index = json.loads((out / "hierarchy.json").read_text())
    assert index["config"]["backbone"] == "efficientnet-lite0" and "torch" in index["versions"]
    for folder in ("parent", "a", "b", "a/x"):
        node = out / folder
        for name in (
            "model.pth",
            "node.json",
            "bin/encoder.pickle",
            "bin/test_transforms.pickle",
            "bin/inv_normalize.pickle",
            "performance.txt",
            "confusion_matrix.png",
            "class_plot.png",
            "error_plot.png",
            "wrong_plot.png",
        ):
            assert (node / name).is_file(), f"{folder}/{name}"
        assert (node / "class_plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        info = artefacts.read_info(node)
        assert info.backbone == "efficientnet-lite0" and info.data["image_size"] == 32
        assert len(info.history) == 2 and info.data_hash
        assert "accuracy" in (node / "performance.txt").read_text()
    assert artefacts.read_info(out / "a").classes == ["x", "y"]
    constant = artefacts.read_info(out / "c")
    assert constant.kind == "constant" and constant.classes == ["only"]
    assert not (out / "c" / "model.pth").exists()
    assert "constant node" in result.output
    assert "finetune mode runs on the CPU" in result.output and "fine-tuning on a CPU is slow" in result.output

    again = run("train", "--data", split, "--out", out, "--backbone", "efficientnet-lite0", "--epochs", "2", *FAST)
    assert again.exit_code == 0 and again.output.count("already trained, skipped") == 4


def test_artefact_round_trip_gives_identical_logits(split, tmp_path):
    out = tmp_path / "models"
    config = TrainConfig(backbone="efficientnet-lite0", image_size=32, epochs=1, batch_size=8, workers=0, device="cpu")
    train_nodes(split, out, config, nodes=["b"])
    loaded = artefacts.load_node(out / "b")
    again = artefacts.load_node(out / "b")
    image = open_rgb(next((split / "b").glob("train.csv")).read_text().splitlines()[1].split(",")[0])
    x = loaded.transforms(image).unsqueeze(0)
    assert x.shape == (1, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(loaded.network(x), again.network(x))
    state = torch.load(out / "b" / "model.pth", weights_only=True)
    fresh = backbones.build("efficientnet-lite0", 2)
    fresh.load_state_dict(state)
    fresh.eval()
    with torch.inference_mode():
        assert torch.equal(fresh(x), loaded.network(x))


@pytest.mark.parametrize("name", ["efficientnet-b0", "efficientnet-lite0"])
def test_one_training_step_of_each_backbone_family(name):
    model = backbones.create(name, 3, pretrained=False)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert model(x).shape == (4, 3)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_head_replaces_the_imagenet_layer_and_pretrained_weights_load():
    model = backbones.create("efficientnet-lite0", 5)
    assert model._fc.out_features == 5
    reference = backbones.load_pretrained_state("efficientnet-lite0")
    assert torch.equal(model.state_dict()["_conv_stem.weight"], reference["_conv_stem.weight"])


def test_missing_weights_is_one_sentence_naming_the_options(split, tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    result = run("train", "--data", split, "--out", tmp_path / "m", "--backbone", "efficientnet-b0", *FAST)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    for option in ("--weights", "--no-pretrained", "efficientnet-lite0"):
        assert option in result.output
    assert not (tmp_path / "m" / "parent" / "model.pth").exists()


def test_weights_file_and_no_pretrained(split, tmp_path):
    weights = tmp_path / "b0.pth"
    torch.save(backbones.build("efficientnet-b0", 1000).state_dict(), weights)
    ok = run(
        "train",
        "--data",
        split,
        "--out",
        tmp_path / "m1",
        "--backbone",
        "efficientnet-b0",
        "--weights",
        weights,
        "--node",
        "b",
        "--epochs",
        "1",
        *FAST,
    )
    assert ok.exit_code == 0, ok.output
    assert "node b: ready in" in ok.output and "node(s) ready" not in ok.output  # a per-node line, not a total
    scratch = run(
        "train",
        "--data",
        split,
        "--out",
        tmp_path / "m2",
        "--backbone",
        "efficientnet-b0",
        "--no-pretrained",
        "--node",
        "b",
        "--epochs",
        "1",
        *FAST,
    )
    assert scratch.exit_code == 0, scratch.output
    assert artefacts.read_info(tmp_path / "m2" / "b").config["pretrained"] is False


def test_config_file_is_read_and_flags_override_it(split, tmp_path):
    cfg = tmp_path / "lcpn.toml"
    cfg.write_text('[train]\nbackbone = "efficientnet-lite0"\nimage-size = 32\nepochs = 1\nlr = 0.002\n')
    result = run(
        "train",
        "--data",
        split,
        "--out",
        tmp_path / "m",
        "--config",
        cfg,
        "--node",
        "b",
        "--lr",
        "0.001",
        "--workers",
        "0",
        "--batch-size",
        "8",
    )
    assert result.exit_code == 0, result.output
    config = artefacts.read_info(tmp_path / "m" / "b").config
    assert (config["backbone"], config["image_size"], config["epochs"], config["lr"]) == (
        "efficientnet-lite0",
        32,
        1,
        0.001,
    )
    (tmp_path / "bad.toml").write_text("epochz = 3\n")
    bad = run("train", "--data", split, "--config", tmp_path / "bad.toml")
    assert bad.exit_code == 2 and "unknown option(s) epochz" in bad.output
    (tmp_path / "zero.toml").write_text("mlp-members = 0\n")
    zero = run("train", "--data", split, "--config", tmp_path / "zero.toml")
    assert zero.exit_code == 2 and "key mlp_members: 0 is not in the range x>=1" in zero.output


def test_resume_after_kill_continues_from_last_finished_epoch(split, tmp_path):
    out = tmp_path / "models"
    args = [
        sys.executable,
        "-m",
        "lcpn",
        "train",
        "--data",
        str(split),
        "--out",
        str(out),
        "--node",
        "b",
        "--backbone",
        "efficientnet-lite0",
        "--epochs",
        "40",
        "--patience",
        "40",
        *FAST,
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = out / "b" / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists(), "no checkpoint was written before the kill"
    done = torch.load(checkpoint, weights_only=True)["progress"]["epoch"]
    assert 1 <= done < 40
    assert not (out / "b" / "node.json").exists()  # a killed node never looks finished
    assert (out / "b" / ".train.lock").exists()  # the killed run's lock, taken over below: its pid is gone

    resumed = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after epoch {done}" in resumed.stdout + resumed.stderr
    info = artefacts.read_info(out / "b")
    assert [h["epoch"] for h in info.history] == list(range(1, len(info.history) + 1))
    assert not checkpoint.exists() and not [p for p in (out / "b").iterdir() if p.name.startswith(".")]


def test_hostile_pickle_is_refused_and_runs_nothing(split, tmp_path):
    out = tmp_path / "models"
    train_nodes(
        split,
        out,
        TrainConfig(backbone="efficientnet-lite0", image_size=32, epochs=1, batch_size=8, workers=0, device="cpu"),
        nodes=["b"],
    )
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (out / "b" / "bin" / "test_transforms.pickle").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(artefacts.ArtefactError, match="not on the allow-list"):
        artefacts.load_node(out / "b")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--data", "{p}/nowhere"], ["not a prepared split"]),
        (["--backbone", "resnet50"], ["unknown backbone", "efficientnet-b4", "efficientnet-lite0"]),
        (["--node", "zzz"], ["unknown parent node", "root, a, b, c, a/x"]),
        (["--node", "a/y"], ["unknown parent node"]),
    ],
)
def test_train_user_errors(split, tmp_path, args, words):
    args = [a.format(p=tmp_path) for a in args]
    if "--data" not in args:
        args += ["--data", str(split)]
    result = run("train", "--out", tmp_path / "m", *args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.output


class Killed(Exception):
    """Stands for a kill -9: nothing after it runs."""


def test_resume_after_a_kill_mid_epoch_equals_an_uninterrupted_run(split, tmp_path, monkeypatch):
    # LP-FT and WiSE-FT on; the saved half-and-half mix needs both the probe and the fine-tuned weights
    monkeypatch.setattr(finetune, "WISE_ALPHAS", (0.5,))
    config = LITE.replace(epochs=2, patience=5, init_head="probe", wise_ft=True)
    train_nodes(split, tmp_path / "whole", config, nodes=["b"])

    real_getitem, calls = finetune.ImageDataset.__getitem__, []
    n_images = len(read_csv(split / "b" / "train.csv")) + len(read_csv(split / "b" / "val.csv"))

    def killed_in_epoch_2(self, i):
        calls.append(i)
        if len(calls) > 2 * n_images + 3:  # the probe's pass and epoch 1 (train and val) done, a few images more
            raise Killed
        return real_getitem(self, i)

    monkeypatch.setattr(finetune.ImageDataset, "__getitem__", killed_in_epoch_2)
    with pytest.raises(Killed):
        train_nodes(split, tmp_path / "resumed", config, nodes=["b"])
    monkeypatch.setattr(finetune.ImageDataset, "__getitem__", real_getitem)
    torch.manual_seed(1234)  # the resumed run must not depend on the state it starts in
    train_nodes(split, tmp_path / "resumed", config, nodes=["b"])

    whole = torch.load(tmp_path / "whole" / "b" / "model.pth", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "b" / "model.pth", weights_only=True)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    losses = [[h["train_loss"] for h in artefacts.read_info(tmp_path / m / "b").history] for m in ("whole", "resumed")]
    assert losses[0] == losses[1] and len(losses[0]) == 2
    records = [artefacts.read_info(tmp_path / m / "b").finetune for m in ("whole", "resumed")]
    assert records[0] == records[1] and records[0]["probe"]  # the probe came back from the checkpoint


def test_resume_reads_the_checkpoint_on_the_cpu_whatever_the_device(tmp_path):
    def training(device):
        model = torch.nn.Linear(3, 2).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        return finetune.Training(model, optimizer, scheduler, scaler, torch.Generator().manual_seed(5), device)

    run = training(torch.device("cpu"))
    run.model(torch.randn(4, 3)).sum().backward()
    run.optimizer.step()
    run.progress.epoch = 1
    run.generator.seed()
    run.save(tmp_path / "checkpoint.pt", {"k": 1})
    rng, loader_rng = torch.get_rng_state(), run.generator.get_state()
    torch.manual_seed(99)

    # "meta" stands for a GPU here: a checkpoint loaded onto it cannot restore the CPU's RNG
    elsewhere = training(torch.device("meta"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # copying CPU weights into meta parameters is a no-op
        assert elsewhere.restore(tmp_path / "checkpoint.pt", {"k": 1})
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(elsewhere.generator.get_state(), loader_rng)
    assert elsewhere.progress.epoch == 1
    assert elsewhere.optimizer.state_dict()["state"][0]["exp_avg"].device.type == "meta"
    assert not training(torch.device("cpu")).restore(tmp_path / "checkpoint.pt", {"k": 2})  # other options


def test_precision_flag_applies_to_finetune(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert finetune.MixedPrecision("auto", cuda).enabled
    assert not finetune.MixedPrecision("fp32", cuda).enabled
    assert not finetune.MixedPrecision("auto", cpu).enabled
    bf16 = finetune.MixedPrecision("bf16", cpu)
    assert bf16.enabled and bf16.dtype == torch.bfloat16 and not bf16.scaler.is_enabled()


def test_a_bf16_training_pass_runs_the_network_under_bf16_autocast():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2))  # fmt: skip
    dtypes = []
    model[-1].register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    before = [p.detach().clone() for p in model.parameters()]
    batches = [(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 0, 1]), torch.arange(4))]
    amp = finetune.MixedPrecision("bf16", torch.device("cpu"))
    result = finetune._run_epoch(model, batches, torch.device("cpu"), amp, torch.nn.CrossEntropyLoss(), optimizer,
                                 scheduler)  # fmt: skip
    assert dtypes == [torch.bfloat16] and math.isfinite(result["loss"])
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights stay fp32
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_early_stopping_restores_the_best_weights(split, tmp_path, monkeypatch):
    real_run_epoch, val_accuracy, snapshots = finetune._run_epoch, iter([0.5, 0.9, 0.6, 0.95]), []

    def scripted(model, loader, *args, desc="", **kwargs):
        result = real_run_epoch(model, loader, *args, desc=desc, **kwargs)
        if desc.endswith(" eval") and not desc.endswith("final eval"):
            result["acc"] = next(val_accuracy)
            snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return result

    monkeypatch.setattr(finetune, "_run_epoch", scripted)
    train_nodes(split, tmp_path, LITE.replace(epochs=10, patience=1, wise_ft=False), nodes=["b"])
    info = artefacts.read_info(tmp_path / "b")
    assert [(h["epoch"], h["best"]) for h in info.history] == [(1, True), (2, True), (3, False)]
    saved = torch.load(tmp_path / "b" / "model.pth", weights_only=True)
    assert all(torch.equal(saved[k], snapshots[1][k]) for k in saved)  # epoch 2's weights, not epoch 3's
    assert not all(torch.equal(saved[k], snapshots[2][k]) for k in saved)


def test_class_weights_lift_rare_classes_up_to_a_cap():
    w = class_weights([10000, 400, 1, 0])
    assert w[3] == 0  # a class without train images
    assert torch.isclose(w[1] / w[0], torch.tensor(5.0))  # sqrt(10000 / 400)
    assert torch.isclose(w[2] / w[0], torch.tensor(10.0))  # sqrt(10000 / 1) = 100, capped at 10
    counts = torch.tensor([10000.0, 400, 1, 0])
    assert torch.isclose((w * counts).sum() / counts.sum(), torch.tensor(1.0))  # mean weight per image


def test_a_node_without_val_images_is_evaluated_on_its_train_images(split, tmp_path):
    import shutil

    data = tmp_path / "split"
    shutil.copytree(split, data)
    (data / "b" / "val.csv").write_text((data / "b" / "val.csv").read_text().splitlines()[0] + "\n")
    train_nodes(data, tmp_path / "m", LITE, nodes=["b"])
    info = artefacts.read_info(tmp_path / "m" / "b")
    n_train = len(read_csv(data / "b" / "train.csv"))
    assert info.metrics["evaluated_on"] == "train (no val images)" and info.metrics["n"] == n_train
    assert "evaluated on: train (no val images)" in (tmp_path / "m" / "b" / "performance.txt").read_text()
