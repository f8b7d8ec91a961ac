"""LP-FT and WiSE-FT in finetune mode (Lite0 at 32 px on the CPU)."""

import pytest
import torch
from click.testing import CliRunner
from conftest import FAST

from lcpn import artefacts, backbones, features, finetune
from lcpn.cli import main
from lcpn.config import TrainConfig
from lcpn.embedding_store import EmbeddingStore
from lcpn.hierarchy import Hierarchy
from lcpn.images import open_rgb
from lcpn.nodes import load_node_data
from lcpn.recipe import data_config_for, seed_everything
from lcpn.train import train_nodes
from lcpn.transforms import eval_transform

LITE = TrainConfig(backbone="efficientnet-lite0", image_size=32, epochs=1, batch_size=8, workers=0, device="cpu")
CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def node_b(split):
    return load_node_data(split, Hierarchy.load(split / "hierarchy.json"), "b")


def pretrained_with_probe(data) -> tuple[torch.nn.Module, dict]:
    """The network LP-FT starts from: pretrained, its last layer the node's probe (as fit_node makes it)."""
    config = LITE.resolved()
    seed_everything(config.seed)
    # channels_last as in fit_node: the convolutions' float rounding, hence the probe, depend on the layout
    model = backbones.create(config.backbone, len(data.classes)).to(memory_format=torch.channels_last)
    head, probe = finetune.fit_probe(
        model, data, data_config_for(config), config, CPU, finetune.MixedPrecision("fp32", CPU)
    )
    model.load_state_dict(head, strict=False)
    return model.eval(), probe


def test_lp_ft_starts_from_the_linear_probe_that_features_mode_fits(node_b, tmp_path):
    model, probe = pretrained_with_probe(node_b)
    # features mode's linear head on the same frozen network's final features, fit on train alone
    config = LITE.replace(mode="features", head="linear", stage_features=0, views=1, test_flips=False, refit=False)
    backbone, key = features.open_backbone(config)
    paths = [p for p, _ in node_b.train + node_b.val]
    feats = features.embed_images(paths, backbone, EmbeddingStore(tmp_path, key))
    stub = artefacts.NodeInfo(node="b", classes=node_b.classes, mode="features",
                              head=features.head_spec(config, backbone.embedder.dim))  # fmt: skip
    head, outcome, _ = features.fit_head(node_b, feats, stub, config)

    val = [p for p, _ in node_b.val]
    pixels = torch.stack([eval_transform(data_config_for(LITE))(open_rgb(p)) for p in val])
    with torch.inference_mode():
        network = model(pixels).softmax(1)  # before any step of fine-tuning
        probe_head = head(torch.stack([feats[p][0] for p in val])).softmax(1)
    assert torch.equal(network.argmax(1), probe_head.argmax(1))
    # two L-BFGS solves on features equal up to float rounding stop within the solver's tolerance
    assert torch.allclose(network, probe_head, atol=0.01)
    assert (probe["C"], probe["val_acc"]) == (stub.head["C"], outcome.accuracy)


def test_wise_ft_mixes_end_exactly_at_the_start_and_the_fine_tuned_weights():
    start = backbones.build("efficientnet-lite0", 2).state_dict()
    tuned = {k: v + 1 if v.is_floating_point() else v + 7 for k, v in start.items()}
    for alpha, expected in ((0.0, start), (1.0, tuned)):
        mixed = finetune.mix_weights(start, tuned, alpha)
        assert all(torch.equal(mixed[k], expected[k]) for k in start if start[k].is_floating_point())
    half = finetune.mix_weights(start, tuned, 0.5)
    assert torch.allclose(half["_fc.weight"], start["_fc.weight"] + 0.5)
    assert torch.allclose(half["_bn0.running_var"], start["_bn0.running_var"] + 0.5)  # BatchNorm statistics mix too
    assert torch.equal(half["_bn0.num_batches_tracked"], tuned["_bn0.num_batches_tracked"])


def test_wise_ft_saves_the_mix_with_the_best_val_accuracy_and_records_every_mix(split, node_b, tmp_path):
    train_nodes(split, tmp_path / "tuned", LITE.replace(init_head="probe"), nodes=["b"])
    train_nodes(split, tmp_path / "wise", LITE.replace(init_head="probe", wise_ft=True), nodes=["b"])
    tuned = torch.load(tmp_path / "tuned" / "b" / "model.pth", weights_only=True)
    start = pretrained_with_probe(node_b)[0].state_dict()

    info = artefacts.read_info(tmp_path / "wise" / "b")
    record = info.finetune["wise_ft"]
    assert [m["alpha"] for m in record["mixes"]] == list(finetune.WISE_ALPHAS)
    assert record["alpha"] == max(record["mixes"], key=lambda m: (m["val_acc"], -m["val_loss"]))["alpha"]
    assert info.finetune["init_head"] == "probe" and info.finetune["probe"]["C"] in features.C_GRID
    saved = torch.load(tmp_path / "wise" / "b" / "model.pth", weights_only=True)
    expected = finetune.mix_weights(start, tuned, record["alpha"])
    assert all(torch.equal(saved[k], expected[k]) for k in saved)
    assert f"WiSE-FT kept {record['alpha']:g} x fine-tuned" in (tmp_path / "wise" / "b" / "performance.txt").read_text()
    assert "wise_ft" not in artefacts.read_info(tmp_path / "tuned" / "b").finetune


def test_lp_ft_and_wise_ft_are_flags_and_off_by_default(split, tmp_path):
    out = tmp_path / "m"
    result = CliRunner().invoke(main, ["train", "--data", str(split), "--out", str(out), "--node", "b",
                                       "--backbone", "efficientnet-lite0", "--epochs", "1", "--init-head", "random",
                                       "--no-wise-ft", *FAST])  # fmt: skip
    assert result.exit_code == 0, result.output
    info = artefacts.read_info(out / "b")
    assert info.finetune == {"init_head": "random"}
    assert (info.config["init_head"], info.config["wise_ft"]) == ("random", False)
    assert "linear probe" not in result.output and "WiSE-FT" not in (out / "b" / "performance.txt").read_text()
    assert (TrainConfig().init_head, TrainConfig().wise_ft) == ("random", False)


def test_freeze_bn_keeps_the_pretrained_batchnorm_statistics_while_the_weights_train(split, tmp_path):
    pretrained = backbones.create("efficientnet-lite0", 2).state_dict()
    for frozen in (False, True):
        train_nodes(split, tmp_path / str(frozen), LITE.replace(freeze_bn=frozen), nodes=["b"])
    stats = [k for k in pretrained if k.endswith(("running_mean", "running_var"))]
    for frozen in (False, True):
        saved = torch.load(tmp_path / str(frozen) / "b" / "model.pth", weights_only=True)
        assert all(torch.equal(saved[k], pretrained[k]) for k in stats) is frozen
        assert not torch.equal(saved["_conv_stem.weight"], pretrained["_conv_stem.weight"])  # the network trained
        assert artefacts.read_info(tmp_path / str(frozen) / "b").config["freeze_bn"] is frozen
