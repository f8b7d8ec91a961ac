import numpy as np
import pytest
from hiclass import metrics as hm

from lcpn.metrics import (
    error_propagation,
    first_mistake_depth,
    hierarchical_prf,
    leaf_scores,
    level_scores,
    mistake_severity,
    path_accuracy,
    summarize,
)

TRUE = ["a/x/p", "a/x/q", "a/y", "b/x", "b/z"]
PRED = ["a/x/p", "a/x/p", "b/x", "a/x/q", "b"]  # right, sibling, wrong top, wrong top (same name x), stopped


def test_path_and_level_accuracy_by_hand():
    assert path_accuracy(TRUE, PRED) == pytest.approx(1 / 5)
    levels = level_scores(TRUE, PRED)
    assert [lv["depth"] for lv in levels] == [1, 2, 3]
    assert levels[0]["accuracy"] == pytest.approx(3 / 5)  # a a b b b vs a a b a b
    assert levels[1]["accuracy"] == pytest.approx(2 / 5)  # a/x a/x (a/y:b/x) (b/x:a/x) (b/z:none)
    assert levels[2]["accuracy"] == pytest.approx(1 / 2)  # only the two depth-3 truths count
    assert levels[2]["n"] == 2


def test_hierarchical_prf_by_hand():
    # |T ∩ P| per image: 3, 2, 0, 0, 1 = 6; |P|: 3, 3, 2, 3, 1 = 12; |T|: 3, 3, 2, 2, 2 = 12
    scores = hierarchical_prf(TRUE, PRED)
    assert scores["precision"] == pytest.approx(6 / 12)
    assert scores["recall"] == pytest.approx(6 / 12)
    assert scores["f1"] == pytest.approx(0.5)


def test_same_name_under_other_parent_is_not_a_match():
    assert hierarchical_prf(["b/x"], ["a/x"])["f1"] == 0.0


def _levels(paths, depth=3):
    """Path-qualified labels per level, padded with '' as hiclass expects."""
    rows = []
    for p in paths:
        names = p.split("/")
        rows.append(["/".join(names[: i + 1]) for i in range(len(names))] + [""] * (depth - len(names)))
    return np.array(rows, dtype=object)


@pytest.mark.parametrize("seed", range(3))
def test_hierarchical_prf_agrees_with_hiclass(seed):
    rng = np.random.default_rng(seed)
    leaves = ["a/x/p", "a/x/q", "a/y", "b/x", "b/z", "c/x/p"]
    y_true = [leaves[i] for i in rng.integers(0, len(leaves), 40)]
    y_pred = [leaves[i] for i in rng.integers(0, len(leaves), 40)]
    ours = hierarchical_prf(y_true, y_pred)
    t, p = _levels(y_true), _levels(y_pred)
    assert ours["precision"] == pytest.approx(hm.precision(t, p))
    assert ours["recall"] == pytest.approx(hm.recall(t, p))
    assert ours["f1"] == pytest.approx(hm.f1(t, p))


def test_mistake_severity_and_first_mistake():
    # distances of the wrong ones: a/x/q-a/x/p 2, a/y-b/x 4, b/x-a/x/q 5, b/z-b 1
    assert mistake_severity(TRUE, PRED) == pytest.approx((2 + 4 + 5 + 1) / 4)
    assert mistake_severity(["a"], ["a"]) is None
    assert first_mistake_depth("a/x/q", "a/x/p") == 3
    assert first_mistake_depth("b/z", "b") == 2
    assert first_mistake_depth("a/y", "a/y") is None


def test_error_propagation_by_hand():
    local = {"": (3, 5), "a": (2, 3), "a/x": (1, 2), "b": (1, 2)}
    out = error_propagation(TRUE, PRED, local, ["", "a", "b", "a/x"])
    assert out["(root)"] == {
        "n": 5,
        "local_accuracy": 0.6,
        "cascade_accuracy": 0.6,
        "leaf_errors": 4,
        "from_ancestors": 0.0,
    }
    # under a: a/x/p right, a/x/q right at a, a/y wrong at root already
    assert out["a"]["cascade_accuracy"] == pytest.approx(2 / 3)
    assert out["a"]["from_ancestors"] == pytest.approx(1 / 2)  # a/y began at the root, a/x/q at a/x
    assert out["a/x"]["cascade_accuracy"] == pytest.approx(1 / 2)
    assert out["b"]["from_ancestors"] == pytest.approx(1 / 2)  # b/x began at root; b/z stopped at b


def test_summarize_layout():
    m = summarize(TRUE, PRED, {}, ["", "a"])
    assert set(m) == {"n_images", "levels", "path_accuracy", "hierarchical", "mistake_severity", "error_propagation"}
    assert m["error_propagation"]["began_above_last_level"] == pytest.approx(2 / 4)


@pytest.mark.filterwarnings("error::sklearn.exceptions.UndefinedMetricWarning")
def test_leaf_scores_by_hand():
    leaves = ["a/x/p", "a/x/q", "a/y", "b/x", "b/z", "c/never"]
    scores = {s["leaf"]: s for s in leaf_scores(TRUE, PRED, leaves)}
    assert list(scores) == ["a/x/p", "a/x/q", "a/y", "b/x", "b/z"]  # c/never is neither true nor predicted
    # a/x/p: predicted twice, right once; true once
    assert scores["a/x/p"] == {"leaf": "a/x/p", "precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3),
                               "support": 1}  # fmt: skip
    # a/x/q: predicted once (for b/x), never right; b/z: the prediction stopped at b
    assert scores["a/x/q"]["precision"] == 0.0 and scores["a/x/q"]["recall"] == 0.0
    assert scores["b/z"] == {"leaf": "b/z", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert leaf_scores([], [], leaves) == []
