"""Routing and decoding: the decoders as pure functions over a table, and the Cascade with stub nodes."""

import pytest
import torch
from PIL import Image

from lcpn.artefacts import ArtefactError
from lcpn.cascade import Cascade, best_first, cut, greedy
from lcpn.hierarchy import Hierarchy, names_of
from lcpn.models import ConstantNode

TREE = Hierarchy.from_leaves(["a/x/p", "a/x/q", "a/y", "b/u", "b/v", "c/only"])

# Per node and image id: child probabilities. Image 1 is where greedy and best-path disagree:
# greedy takes a (0.6) then a/x p or q at 0.6*0.5, best-path takes b (0.4) then u at 0.4*0.95.
TABLES = {
    "": {0: [0.9, 0.05, 0.05], 1: [0.6, 0.4, 0.0], 2: [0.1, 0.2, 0.7], 3: [0.2, 0.7, 0.1]},
    "a": {0: [0.8, 0.2], 1: [0.9, 0.1], 3: [0.5, 0.5]},
    "a/x": {0: [0.3, 0.7], 1: [0.5, 0.5]},
    "b": {1: [0.95, 0.05], 3: [0.4, 0.6]},
    "c": {},
}


def table(node, row):
    n = len(TREE.children[node])
    return TABLES[node].get(row, [1 / n] * n)


class Lookup:
    """The decoders' probability source, straight from TABLES; records every round of requests."""

    def __init__(self):
        self.rounds = []

    def __call__(self, requests):
        self.rounds.append(sorted(requests))
        return {(row, node): table(node, row) for row, node in requests}


def test_greedy_decoding_without_any_network():
    lookup = Lookup()
    paths = greedy(TREE, [0, 1, 2], lookup)
    assert paths[0] == [("a", 0.9), ("a/x", 0.8), ("a/x/q", 0.7)]
    assert paths[1] == [("a", 0.6), ("a/x", 0.9), ("a/x/p", 0.5)]  # a tie goes to the first child
    assert paths[2] == [("c", 0.7), ("c/only", 1.0)]
    # one round per level, each asking for every image still descending
    assert lookup.rounds == [[(0, ""), (1, ""), (2, "")], [(0, "a"), (1, "a"), (2, "c")], [(0, "a/x"), (1, "a/x")]]


def test_best_first_gives_the_k_best_paths_exactly():
    found = best_first(TREE, [0, 1], Lookup(), k=4)
    everything = {
        ("a", "a/x", "a/x/p"): 0.9 * 0.8 * 0.3, ("a", "a/x", "a/x/q"): 0.9 * 0.8 * 0.7, ("a", "a/y"): 0.9 * 0.2,
        ("b", "b/u"): 0.05 * 0.5, ("b", "b/v"): 0.05 * 0.5, ("c", "c/only"): 0.05,
    }  # fmt: skip
    expected = sorted(everything.items(), key=lambda kv: -kv[1])[:4]
    assert [tuple(node for node, _ in steps) for _, steps in found[0]] == [path for path, _ in expected]
    assert [p for p, _ in found[0]] == pytest.approx([p for _, p in expected])
    assert [node for node, _ in found[1][0][1]] == ["b", "b/u"] and found[1][0][0] == pytest.approx(0.4 * 0.95)


def test_best_first_asks_only_for_the_nodes_it_expands():
    lookup = Lookup()
    best_first(TREE, [0], lookup, k=1)
    assert lookup.rounds == [[(0, "")], [(0, "a")], [(0, "a/x")]]  # b and c are never needed


def test_cut_keeps_the_root_and_stops_below_the_threshold():
    steps = [("a", 0.6), ("a/x", 0.9), ("a/x/p", 0.5)]
    assert cut(steps, 0.75) == (steps[:2], True)
    assert cut(steps, 0.0) == (steps, False)
    assert cut(steps, 0.95) == (steps[:1], True)  # the root's decision is always kept


class StubNode:
    """Fixed child probabilities per image id; records every call to check the batching."""

    def __init__(self, node, calls):
        self.node, self.calls = node, calls
        self.classes = [names_of(c)[-1] for c in TREE.children[node]]

    def per_image(self):
        return {"id": image_id}

    def probs(self, batch, rows):
        ids = batch.per_image("id", image_id, rows).tolist()
        self.calls.append((self.node, ids))
        return torch.tensor([table(self.node, i) for i in ids])


def image_id(image):
    """Images are ids, or pictures whose first pixel's red value is the id (as the input pipeline sees them)."""
    return torch.tensor(image if isinstance(image, int) else image.getpixel((0, 0))[0])


@pytest.fixture
def cascade():
    calls = []
    nodes = {n: StubNode(n, calls) for n in TREE.trainable}
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
    greedy_pred = cascade.predict_batch([1], decode="greedy", top_k=0)[0]
    best = cascade.predict_batch([1], decode="best-path", top_k=0)[0]
    assert greedy_pred.path == ["a", "x", "p"] and greedy_pred.path_probability == pytest.approx(0.6 * 0.9 * 0.5)
    assert best.path == ["b", "u"] and best.path_probability == pytest.approx(0.4 * 0.95)


def test_top_k_is_exact_and_ordered(cascade):
    pred = cascade.predict_batch([0], top_k=4)[0]
    probs = [t["probability"] for t in pred.top_k]
    assert [t["path"] for t in pred.top_k] == [["a", "x", "q"], ["a", "x", "p"], ["a", "y"], ["c", "only"]]
    assert probs == pytest.approx([0.9 * 0.8 * 0.7, 0.9 * 0.8 * 0.3, 0.9 * 0.2, 0.05])


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
        [p.to_dict() for p in cascade.predict(paths, batch_size=b, top_k=3, decode=decode)] for b in (1, 2, 3, 5, 64)
    ]
    assert all(r == runs[0] for r in runs)
    assert [r["image"] for r in runs[0]] == [str(p) for p in paths]
    assert runs[0][2]["error"] == "not an image file" and runs[0][2]["path"] == []
    assert all(r["error"] is None for i, r in enumerate(runs[0]) if i != 2)
    assert [r["path"] for r in runs[0]][:2] == [p.path for p in cascade.predict_batch([0, 1], decode=decode)]


def test_node_probabilities_never_run_a_model_twice(cascade):
    from lcpn.models import Batch

    batch, probs = Batch([0, 1]), {}
    cascade.node_probabilities(batch, probs, [(0, ""), (1, ""), (0, "a")])
    cascade.node_probabilities(batch, probs, [(0, ""), (1, "a"), (0, "a")])
    assert cascade.calls == [("", [0, 1]), ("a", [0]), ("a", [1])]


def test_cascade_refuses_nodes_that_do_not_fit_the_tree():
    nodes = {n: ConstantNode(["only"]) for n in TREE.parents}
    misfit = r"the model of node 'root' knows \['only'\], but the tree has \['a', 'b', 'c'\]"
    with pytest.raises(ArtefactError, match=misfit):
        Cascade(TREE, nodes)
    with pytest.raises(ArtefactError, match=r"^no model for node\(s\) root, a, b, c, a/x; run `lcpn train` for them$"):
        Cascade(TREE, {})
