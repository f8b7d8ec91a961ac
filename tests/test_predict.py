import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from lcpn.cli import main
from lcpn.hierarchy import Hierarchy, names_of
from lcpn.predict import Batch, Cascade, ConstantNode

TREE = Hierarchy.from_leaves(["a/x/p", "a/x/q", "a/y", "b/u", "b/v", "c/only"])


class StubNode:
    """Fixed child probabilities per image id; records every call to check the batching."""

    def __init__(self, node, table, calls):
        self.node, self.table, self.calls = node, table, calls
        self.classes = [names_of(c)[-1] for c in TREE.children[node]]

    def probs(self, batch, rows):
        ids = [image_id(batch.images[r]) for r in rows]
        self.calls.append((self.node, ids))
        return torch.tensor([self.table.get(i, [1 / len(self.classes)] * len(self.classes)) for i in ids])


def image_id(image):
    return image if isinstance(image, int) else image.getpixel((0, 0))[0]


# Per image id: probabilities at each node. Image 1 is where greedy and best-path disagree:
# greedy takes a (0.6) then a/x p or q at 0.6*0.5, best-path takes b (0.4) then u at 0.4*0.95.
TABLES = {
    "": {0: [0.9, 0.05, 0.05], 1: [0.6, 0.4, 0.0], 2: [0.1, 0.2, 0.7], 3: [0.2, 0.7, 0.1]},
    "a": {0: [0.8, 0.2], 1: [0.9, 0.1], 3: [0.5, 0.5]},
    "a/x": {0: [0.3, 0.7], 1: [0.5, 0.5]},
    "b": {1: [0.95, 0.05], 3: [0.4, 0.6]},
}


@pytest.fixture
def cascade():
    calls = []
    nodes = {n: StubNode(n, TABLES.get(n, {}), calls) for n in TREE.trainable}
    nodes["c"] = ConstantNode(["only"])
    c = Cascade(TREE, nodes)
    c.calls = calls
    return c


def test_greedy_routing_groups_images_by_node(cascade):
    preds = cascade.predict_batch([0, 1, 2, 3], top_k=0, decode="greedy")
    assert [p.path for p in preds] == [["a", "x", "q"], ["a", "x", "p"], ["c", "only"], ["b", "v"]]
    assert preds[0].confidences == pytest.approx([0.9, 0.8, 0.7])
    assert preds[0].path_probability == pytest.approx(0.9 * 0.8 * 0.7)
    # one call per node per round, each with exactly the images routed to it
    assert cascade.calls == [("", [0, 1, 2, 3]), ("a", [0, 1]), ("b", [3]), ("a/x", [0, 1])]


def test_best_path_differs_from_greedy(cascade):
    greedy = cascade.predict_batch([1], decode="greedy", top_k=0)[0]
    best = cascade.predict_batch([1], decode="best-path", top_k=0)[0]
    assert greedy.path == ["a", "x", "p"] and greedy.path_probability == pytest.approx(0.6 * 0.9 * 0.5)
    assert best.path == ["b", "u"] and best.path_probability == pytest.approx(0.4 * 0.95)


def test_top_k_is_exact_and_ordered(cascade):
    pred = cascade.predict_batch([0], top_k=4)[0]
    probs = [t["probability"] for t in pred.top_k]
    assert probs == sorted(probs, reverse=True)
    everything = {
        ("a", "x", "p"): 0.9 * 0.8 * 0.3,
        ("a", "x", "q"): 0.9 * 0.8 * 0.7,
        ("a", "y"): 0.9 * 0.2,
        ("b", "u"): 0.05 * 0.5,
        ("b", "v"): 0.05 * 0.5,
        ("c", "only"): 0.05,
    }
    expected = sorted(everything.items(), key=lambda kv: -kv[1])[:4]
    assert [tuple(t["path"]) for t in pred.top_k] == [p for p, _ in expected]
    assert probs == pytest.approx([p for _, p in expected])


def test_min_confidence_stops_early_but_keeps_the_root(cascade):
    preds = cascade.predict_batch([0, 1, 3], top_k=0, decode="greedy", min_confidence=0.75)
    assert preds[0].path == ["a", "x"] and preds[0].stopped_early  # q has 0.7
    assert preds[1].path == ["a", "x"] and preds[1].stopped_early  # root 0.6 kept; x 0.9; p 0.5 cut
    assert preds[2].path == ["b"] and preds[2].stopped_early and preds[2].confidences == [pytest.approx(0.7)]
    assert preds[2].path_probability == pytest.approx(0.7)
    full = cascade.predict_batch([0], top_k=0, min_confidence=0.0)[0]
    assert not full.stopped_early
    best = cascade.predict_batch([1], top_k=0, min_confidence=0.75)[0]  # the default decoder: best path
    assert best.path == ["b", "u"] and best.confidences == pytest.approx([0.4, 0.95]) and not best.stopped_early


@pytest.mark.parametrize("decode", ["greedy", "best-path"])
def test_any_batch_size_gives_the_same_results_as_one_at_a_time(cascade, tmp_path, decode):
    paths = []
    for i in range(4):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    paths.insert(2, tmp_path / "bad.jpg")
    runs = [
        [p.to_dict() for p in cascade.predict_paths(paths, batch_size=b, top_k=3, decode=decode)]
        for b in (1, 2, 3, 5, 64)
    ]
    assert all(r == runs[0] for r in runs)
    assert [r["image"] for r in runs[0]] == [str(p) for p in paths]
    assert runs[0][2]["error"] == "not an image file" and runs[0][2]["path"] == []
    assert all(r["error"] is None for i, r in enumerate(runs[0]) if i != 2)


def test_cascade_refuses_a_model_that_does_not_fit_the_tree():
    nodes = {n: ConstantNode(["only"]) for n in TREE.parents}
    with pytest.raises(Exception, match="knows"):
        Cascade(TREE, nodes)
    with pytest.raises(Exception, match="no model for node"):
        Cascade(TREE, {})


def test_batch_caches_inputs():
    seen = []

    def compute(items):
        seen.append(list(items))
        return torch.tensor([[float(i)] for i in items])

    batch = Batch([10, 11, 12])
    batch.inputs("k", [0, 2], compute)
    out = batch.inputs("k", [2, 1, 0], compute)
    assert seen == [[10, 12], [11]]
    assert out.squeeze(1).tolist() == [12.0, 11.0, 10.0]


def test_predict_cli_usage_errors(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(main, ["predict", str(tmp_path), "--models", str(tmp_path / "nope")])
    assert missing.exit_code == 2  # empty folder: no images
    (tmp_path / "x.png").write_bytes(b"")
    no_models = runner.invoke(main, ["predict", str(tmp_path), "--models", str(tmp_path / "nope")])
    assert no_models.exit_code == 2 and "does not exist" in no_models.output
    not_lcpn = runner.invoke(main, ["predict", str(tmp_path), "--models", str(tmp_path)])
    assert not_lcpn.exit_code == 2 and "not an lcpn model folder" in not_lcpn.output
    assert "Traceback" not in not_lcpn.output


def test_json_lines_have_the_documented_fields(cascade):
    line = json.dumps(cascade.predict_batch([0], top_k=2)[0].to_dict())
    assert set(json.loads(line)) == {
        "image",
        "path",
        "confidences",
        "path_probability",
        "top_k",
        "stopped_early",
        "error",
    }
