"""`lcpn export` and `--runtime onnx`: the exported graphs give torch's probabilities, the folder is checked."""

import json
import runpy
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from conftest import write_image
from PIL import Image

from lcpn import fsio
from lcpn.artefacts import ArtefactError
from lcpn.cascade import Cascade
from lcpn.cli import main
from lcpn.config import TrainConfig
from lcpn.export import ExportError, export
from lcpn.images import open_rgb
from lcpn.models import Batch
from lcpn.onnx_runtime import load_onnx_models
from lcpn.train import train_nodes
from lcpn.transforms import DataConfig, eval_transform

REPO = Path(__file__).resolve().parent.parent


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def featured(split, tmp_path_factory):
    """Features mode as trained by default (ensemble heads: a mixture of softmaxes; test flips; stage features)."""
    tmp = tmp_path_factory.mktemp("export-features")
    config = TrainConfig(mode="features", backbone="efficientnet-lite0", image_size=32, batch_size=8, workers=0,
                         device="cpu", cache=str(tmp / "cache"), mlp_members=2, head_epochs=5)  # fmt: skip
    train_nodes(split, tmp / "models", config)
    return tmp / "models"


@pytest.fixture(scope="module")
def test_images(split):
    return [r["path"] for r in fsio.read_csv(split / "test.csv")]


def node_probabilities(cascade: Cascade, paths: list[str]) -> dict[str, torch.Tensor]:
    """Every trained node's child probabilities for every image."""
    batch = Batch([open_rgb(p) for p in paths])
    rows = range(len(paths))
    return {node: model.probs(batch, rows) for node, model in cascade.nodes.items() if len(model.classes) > 1}


def assert_same_probabilities(models: Path, exported: Path, paths: list[str]) -> None:
    torch_probs = node_probabilities(Cascade.load(models, "cpu", "fp32"), paths)
    onnx_probs = node_probabilities(Cascade.of(load_onnx_models(exported)), paths)
    assert torch_probs.keys() == onnx_probs.keys() and len(torch_probs) >= 3
    for node, expected in torch_probs.items():
        torch.testing.assert_close(onnx_probs[node], expected, atol=1e-4, rtol=0)


def test_features_mode_is_one_graph_that_gives_torchs_probabilities(featured, test_images, tmp_path):
    out = tmp_path / "onnx"
    result = run("export", "--models", featured, "--out", out, "--opset", 17)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["models"]) == ["lcpn.onnx"] and sorted(p.name for p in out.iterdir()) == [
        "hierarchy.json", "lcpn.onnx", "manifest.json"]  # fmt: skip
    assert manifest["nodes"][""]["output"] == "/" and manifest["nodes"]["c"] == {"classes": ["only"], "constant": True}
    assert manifest["files"]["lcpn.onnx"] == fsio.file_sha256(out / "lcpn.onnx")
    assert manifest["models"]["lcpn.onnx"]["data"] == {"image_size": 32, "mean": [0.498] * 3, "std": [0.502] * 3,
                                                       "square": "squash"}  # fmt: skip
    session = ort.InferenceSession(str(out / "lcpn.onnx"))
    assert sorted(o.name for o in session.get_outputs()) == ["/", "/a", "/a/x", "/b"]
    assert_same_probabilities(featured, out, test_images)


def test_finetune_mode_is_one_file_per_node_that_gives_torchs_probabilities(finetuned, test_images, tmp_path):
    out = tmp_path / "onnx"
    manifest = export(finetuned, out)
    assert sorted(manifest["models"]) == ["nodes/a.onnx", "nodes/a/x.onnx", "nodes/b.onnx", "nodes/parent.onnx"]
    assert manifest["nodes"]["a/x"] == {"classes": ["p", "q"], "file": "nodes/a/x.onnx", "output": "/a/x"}
    assert_same_probabilities(finetuned, out, test_images)


def test_predict_and_evaluate_with_the_onnx_runtime_print_what_torch_prints(featured, split, test_images, tmp_path):
    out = tmp_path / "onnx"
    export(featured, out)
    args = ["predict", *test_images, "--format", "json", "--top-k", "3", "--min-confidence", "0.6"]
    by_torch = run(*args, "--models", featured)
    by_onnx = run(*args, "--models", out, "--runtime", "onnx")
    assert by_torch.exit_code == by_onnx.exit_code == 0, by_onnx.output
    torch_lines = [json.loads(line) for line in by_torch.stdout.splitlines()]
    onnx_lines = [json.loads(line) for line in by_onnx.stdout.splitlines()]
    assert [(d["path"], [t["path"] for t in d["top_k"]], d["stopped_early"]) for d in onnx_lines] == [
        (d["path"], [t["path"] for t in d["top_k"]], d["stopped_early"]) for d in torch_lines]  # fmt: skip
    for ours, theirs in zip(onnx_lines, torch_lines):
        assert ours["confidences"] == pytest.approx(theirs["confidences"], abs=1e-4)
    evaluated = run("evaluate", split, "--models", out, "--runtime", "onnx", "--out", tmp_path / "eval")
    assert evaluated.exit_code == 0, evaluated.output
    torch_metrics = run("evaluate", split, "--models", featured, "--out", tmp_path / "eval-torch")
    assert torch_metrics.exit_code == 0
    path_accuracy = [json.loads((tmp_path / e / "metrics.json").read_text())["path_accuracy"]
                     for e in ("eval", "eval-torch")]  # fmt: skip
    assert path_accuracy[0] == path_accuracy[1]


def test_a_changed_file_is_refused_in_one_sentence(featured, tmp_path):
    out = tmp_path / "onnx"
    export(featured, out)
    graph = out / "lcpn.onnx"
    data = bytearray(graph.read_bytes())
    data[-10] ^= 1  # one bit of one byte
    graph.write_bytes(bytes(data))
    result = run("predict", write_image(tmp_path / "i.png"), "--models", out, "--runtime", "onnx")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: '{graph}' is not the file that was exported (its sha256 differs from manifest.json's); "
        "export the models again."
    )


def test_the_onnx_runtime_says_what_it_cannot_serve(featured, tmp_path):
    with pytest.raises(ArtefactError, match=r"is not an ONNX export \(no manifest.json\); make one with `lcpn"):
        load_onnx_models(featured)
    image = write_image(tmp_path / "i.png")
    wrong = run("predict", image, "--models", featured, "--runtime", "onnx", "--precision", "bf16")
    assert wrong.exit_code == 2 and "--runtime onnx runs on the CPU in the precision it was exported in" in wrong.output
    export(featured, tmp_path / "onnx")
    no_runtime = run("predict", image, "--models", tmp_path / "onnx")
    assert no_runtime.exit_code == 2
    assert f"'{tmp_path / 'onnx'}' is an ONNX export: add --runtime onnx." in no_runtime.output
    calibration = run("export", "--models", featured, "--out", tmp_path / "o", "--calibration", tmp_path)
    assert calibration.exit_code == 2 and "--calibration is read only with --quantize int8." in calibration.output


def test_int8_quantises_the_backbone_and_keeps_float32s_choices(featured, split, tmp_path):
    fp32 = export(featured, tmp_path / "fp32")
    made = run("export", "--models", featured, "--out", tmp_path / "int8", "--quantize", "int8",
               "--calibration", split, "--calibration-images", 16)  # fmt: skip
    assert made.exit_code == 0, made.output
    int8 = json.loads((tmp_path / "int8" / "manifest.json").read_text())
    assert int8["quantize"] == "int8" and fp32["quantize"] is None
    assert (tmp_path / "int8" / "lcpn.onnx").stat().st_size < (tmp_path / "fp32" / "lcpn.onnx").stat().st_size
    graph = onnx.load(str(tmp_path / "int8" / "lcpn.onnx")).graph
    quantised = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    assert any(n.op_type == "Conv" and n.input[1] in quantised for n in graph.node)
    heads = [n for n in graph.node if n.op_type in ("Gemm", "MatMul")]
    assert heads and not any(i in quantised for n in heads for i in n.input)  # the heads stay float32
    images = [r["path"] for r in fsio.read_csv(split / "images.csv")]  # 46: the 6 test images alone are too few
    quantized = node_probabilities(Cascade.of(load_onnx_models(tmp_path / "int8")), images)
    reference = node_probabilities(Cascade.of(load_onnx_models(tmp_path / "fp32")), images)
    assert quantized.keys() == reference.keys()
    for probs in quantized.values():
        torch.testing.assert_close(probs.sum(1), torch.ones(len(images)), atol=1e-3, rtol=0)
    # These heads are barely trained (32 px, 5 epochs), so many choices are near-ties; still most must hold.
    agreeing = torch.cat([probs.argmax(1) == reference[node].argmax(1) for node, probs in quantized.items()])
    assert agreeing.float().mean() >= 0.75


def test_int8_without_calibration_images_says_where_to_find_them(featured, tmp_path):
    moved = tmp_path / "models"
    shutil.copytree(featured, moved)
    tree = json.loads((moved / "hierarchy.json").read_text())
    (moved / "hierarchy.json").write_text(json.dumps(tree | {"split": str(tmp_path / "gone")}))
    with pytest.raises(ExportError, match=r"int8 needs calibration images and the split .* is not there; pass --cal"):
        export(moved, tmp_path / "int8", quantize="int8")
    assert not (tmp_path / "int8").exists()


@pytest.mark.parametrize("square", ["squash", "letterbox", "crop"])
def test_the_plain_python_example_preprocesses_like_lcpn(square):
    example = runpy.run_path(str(REPO / "scripts" / "onnx_predict.py"))
    data = DataConfig(32, (0.498,) * 3, (0.502,) * 3, square)
    rng = np.random.default_rng(0)
    for width, height in [(45, 20), (20, 45), (33, 32), (35, 32)]:  # crop offsets 0.5 and 1.5 round to even
        picture = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        expected = eval_transform(data)(picture).numpy()
        assert example["preprocess"](picture, data.to_dict()) == pytest.approx(expected, abs=1e-6)


def test_the_plain_python_example_finds_lcpns_best_path(featured, test_images, tmp_path):
    export(featured, tmp_path / "onnx")
    example = runpy.run_path(str(REPO / "scripts" / "onnx_predict.py"))
    lcpn_paths = [(p.path, p.path_probability) for p in Cascade.load(featured, "cpu").predict(test_images)]
    for (_, probability, path), (expected, expected_probability) in zip(
        example["predict"](tmp_path / "onnx", test_images), lcpn_paths
    ):
        assert path == expected and probability == pytest.approx(expected_probability, abs=1e-4)


@pytest.mark.parametrize("name", ["efficientnet-b0", "efficientnet-lite0"])
def test_both_efficientnet_packages_export_the_network_they_run(name, tmp_path):
    """B0-B7 need their memory-efficient swish swapped for the plain one; Lite's ReLU6 must stay ReLU6."""
    from lcpn import backbones
    from lcpn.export import Graph, write_onnx

    module = torch.nn.Sequential(backbones.build(name, 3), torch.nn.Softmax(1)).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = module(x)
    write_onnx(Graph("n.onnx", module, DataConfig(32, (0.5,) * 3, (0.5,) * 3), ["/"]), tmp_path / "n.onnx", 17)
    (probs,) = ort.InferenceSession(str(tmp_path / "n.onnx")).run(None, {"image": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(probs), expected, atol=1e-5, rtol=0)
