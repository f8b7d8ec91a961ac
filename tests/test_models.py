"""Loading model folders: precision as trained, per-transform pixels, and what is said when a file is wrong."""

import json
import os

import pytest
import torch
from folders import model_folder
from PIL import Image
from torchvision import transforms as T

from lcpn import artefacts
from lcpn.artefacts import ArtefactError
from lcpn.cascade import Cascade
from lcpn.models import Batch, HeadNode, NetworkNode, load_models, node_problems
from lcpn.runtime import Runtime


def test_batch_caches_inputs():
    seen = []

    def compute(rows):
        seen.append(list(rows))
        return torch.tensor([[float(batch.images[r])] for r in rows])

    batch = Batch([10, 11, 12])
    batch.inputs("k", [0, 2], compute)
    out = batch.inputs("k", [2, 1, 0], compute)
    assert seen == [[0, 2], [1]]
    assert out.squeeze(1).tolist() == [12.0, 11.0, 10.0]


def test_batch_takes_per_image_inputs_from_the_pipeline_or_computes_them():
    prepared = Batch(prepared={"double": torch.tensor([20.0, 22.0, 24.0])})
    assert prepared.size == 3
    assert prepared.per_image("double", None, [2, 0]).tolist() == [24.0, 20.0]
    computed = Batch([10, 11, 12])
    assert computed.per_image("double", lambda i: torch.tensor(2.0 * i), [2, 0]).tolist() == [24.0, 20.0]


class MeanPixel(torch.nn.Module):
    """Two logits from the mean input value: any change in the pixels changes the probabilities."""

    def forward(self, x):
        m = x.mean((1, 2, 3))
        return torch.stack([m, -m], 1)


def test_nodes_with_other_transforms_never_share_pixels():
    cpu = Runtime(torch.device("cpu"))
    plain = NetworkNode(["p", "q"], MeanPixel(), T.Compose([T.Resize((8, 8)), T.ToTensor()]), cpu)
    normalised = T.Compose([T.Resize((8, 8)), T.ToTensor(), T.Normalize([0.5] * 3, [0.1] * 3)])
    other = NetworkNode(["p", "q"], MeanPixel(), normalised, cpu)
    images = [Image.new("RGB", (8, 8), (200, 10, 10))]
    shared = Batch(images)
    plain.probs(shared, [0])
    assert torch.allclose(other.probs(shared, [0]), other.probs(Batch(images), [0]))
    same = NetworkNode(["p", "q"], MeanPixel(), T.Compose([T.Resize((8, 8)), T.ToTensor()]), cpu)
    assert same.pixels_key == plain.pixels_key  # equal transforms still share one pass


def _runtimes(models, precision="as-trained"):
    tree, nodes = load_models(models, "cpu", precision)
    root = nodes[""]
    return (root.backbone.runtime if isinstance(root, HeadNode) else root.runtime).bf16


@pytest.mark.parametrize(
    ("recorded", "override", "bf16"),
    [
        ({"precision": "bf16"}, "as-trained", True),
        ({"precision": "fp32", "bf16": True}, "as-trained", False),  # the newer record wins
        ({"bf16": True}, "as-trained", True),  # folders from before config.precision
        ({"bf16": False}, "as-trained", False),
        ({"precision": "bf16"}, "fp32", False),  # an explicit --precision overrides
        ({"precision": "fp32"}, "bf16", True),
    ],
)
def test_the_backbone_runs_in_the_precision_it_was_trained_in(tmp_path, recorded, override, bf16):
    models = model_folder(tmp_path / "m", ["a", "b"], "features", backbone_config=recorded)
    assert _runtimes(models, override) is bf16


@pytest.mark.parametrize(
    ("recorded", "override", "bf16"),
    [
        ({"precision": "bf16"}, "as-trained", True),
        ({"precision": "auto"}, "as-trained", False),  # the features-mode option, never resolved: not a record
        ({}, "as-trained", False),
        ({}, "bf16", True),
    ],
)
def test_finetuned_nodes_run_as_trained_else_fp32(tmp_path, recorded, override, bf16):
    models = model_folder(tmp_path / "m", ["a", "b"], node_config=recorded)
    assert _runtimes(models, override) is bf16


def test_a_bf16_backbone_predicts_like_fp32(tmp_path):
    models = model_folder(tmp_path / "m", ["a", "b"], "features", backbone_config={"precision": "bf16"})
    image = Image.new("RGB", (40, 40), (120, 30, 200))
    bf16 = Cascade.load(models, "cpu").predict_batch([image])[0]
    fp32 = Cascade.load(models, "cpu", "fp32").predict_batch([image])[0]
    assert bf16.confidences == pytest.approx(fp32.confidences, abs=0.05)


def test_a_full_pickled_model_file_is_refused_in_lcpns_words(tmp_path):
    models = model_folder(tmp_path / "m", ["a", "b"])
    torch.save(torch.nn.Linear(2, 2), models / "parent" / "model.pth")
    with pytest.raises(ArtefactError) as caught:
        load_models(models, "cpu")
    assert str(caught.value) == (
        f"'{models / 'parent' / 'model.pth'}' is not a plain weights file (it holds pickled objects); "
        "lcpn never loads those"
    )


@pytest.mark.parametrize("content", [b"", b"hello", b"x" + os.urandom(300), b"PK\x03\x04 a cut zip archive"])
def test_other_files_are_not_weights_files(tmp_path, content):
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(ArtefactError) as caught:
        artefacts.load_weights(torch.nn.Linear(2, 2), path)
    assert str(caught.value) == f"'{path}' is not a PyTorch weights file (damaged, or another format)"


def test_weights_of_another_network_are_described(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"weight": torch.zeros(3, 2), "extra": torch.zeros(1)}, path)
    with pytest.raises(ArtefactError) as caught:
        artefacts.load_weights(torch.nn.Linear(2, 2), path)
    assert str(caught.value) == (
        f"'{path}' does not fit the network described in node.json: 1 missing and 1 unexpected tensors, "
        "1 of another shape, e.g. missing 'bias'; unexpected 'extra'; 'weight' is 3x2 in the file, 2x2 in the network"
    )


def test_node_problems_names_every_unloadable_node(tmp_path):
    models = model_folder(tmp_path / "m", ["a/x", "a/y", "b/u", "b/v"], "features")
    assert node_problems(models) == {}
    (models / "a" / "model.pth").write_bytes(b"not weights")
    info = json.loads((models / "b" / "node.json").read_text())
    info["classes"] = ["u", "w"]
    (models / "b" / "node.json").write_text(json.dumps(info))
    problems = node_problems(models)
    assert set(problems) == {"a", "b"}
    assert "model.pth' is not a PyTorch weights file" in problems["a"]
    assert "encoder.pickle' does not match the classes in node.json" in problems["b"]


def test_a_model_that_does_not_fit_the_tree_is_refused(tmp_path):
    models = model_folder(tmp_path / "m", ["a", "b"])
    tree = json.loads((models / "hierarchy.json").read_text())
    tree["nodes"][""]["children"] = ["a", "c"]
    tree["nodes"]["c"] = tree["nodes"].pop("b")
    (models / "hierarchy.json").write_text(json.dumps(tree))
    misfit = r"the model of node 'root' knows \['a', 'b'\], but the tree has \['a', 'c'\]"
    with pytest.raises(ArtefactError, match=misfit):
        load_models(models, "cpu")
