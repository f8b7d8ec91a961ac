import unicodedata

import pytest

from lcpn.hierarchy import ROOT, Hierarchy, ancestors, depth_of, tree_distance


def test_depth_one_tree():
    tree = Hierarchy.from_leaves(["cat", "dog"])
    assert tree.parents == [ROOT]
    assert tree.trainable == [ROOT]
    assert tree.leaves == ["cat", "dog"]
    assert tree.max_depth == 1
    assert tree.folders == {ROOT: "parent"}


def test_depth_three_tree_structure():
    tree = Hierarchy.from_leaves(["a/x/p", "a/x/q", "a/y", "b/x", "b/z", "c/only"])
    assert tree.parents == [ROOT, "a", "b", "c", "a/x"]
    assert tree.trainable == [ROOT, "a", "b", "a/x"]  # c has a single child
    assert tree.children["a"] == ("a/x", "a/y")
    assert tree.max_depth == 3
    # the same class name under two parents is two different nodes
    assert "a/x" in tree.children and "b/x" in tree.children
    assert tree.is_leaf("b/x") and not tree.is_leaf("a/x")
    assert tree.child_towards(ROOT, "a/x/p") == "a"
    assert tree.child_towards("a", "a/x/p") == "a/x"
    assert tree.child_towards("b", "a/x/p") is None
    assert tree.leaves_under("a") == ["a/x/p", "a/x/q", "a/y"]
    assert tree.folders["a/x"] == "a/x"


def test_root_folder_collision_and_reserved_names():
    tree = Hierarchy.from_leaves(["parent/a", "parent/b", "bin/c", "bin/d", "e"])
    assert tree.folders[ROOT] == "parent"
    assert tree.folders["parent"] == "parent_2"
    assert tree.folders["bin"] == "bin_2"
    assert len(set(tree.folders.values())) == len(tree.folders)


def test_unsafe_characters_only_change_folders():
    tree = Hierarchy.from_leaves(["what?/a", "what?/b", "what*/c", "what*/d"])
    assert "what?" in tree.children
    assert {tree.folders["what?"], tree.folders["what*"]} == {"what_", "what__2"}


def test_round_trip(tmp_path):
    tree = Hierarchy.from_leaves(["Äpfel und Birnen/grün", "Äpfel und Birnen/rot", "b"])
    import json

    (tmp_path / "h.json").write_text(json.dumps(tree.to_dict()), encoding="utf-8")
    assert Hierarchy.load(tmp_path / "h.json") == tree


def test_describe_draws_the_tree():
    text = Hierarchy.from_leaves(["a/x", "a/y", "b"]).describe()
    assert text.splitlines() == ["a/", "  x", "  y", "b"]


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [("a/x/p", "a/x/p", 0), ("a/x/p", "a/x/q", 2), ("a/x/p", "a/y", 3), ("a/x/p", "b/z", 5)],
)
def test_tree_distance(a, b, distance):
    assert tree_distance(a, b) == distance


def test_ancestors_and_depth():
    assert ancestors("a/x/p") == ["a", "a/x", "a/x/p"]
    assert depth_of(ROOT) == 0 and depth_of("a/x") == 2


def test_folders_stay_distinct_on_file_systems_that_ignore_case_or_unicode_form():
    """macOS and Windows see `Bags` and `bags` (and composed and decomposed `ö`) as one folder."""
    composed, decomposed = "Gr\u00f6\u00dfe", "Gro\u0308\u00dfe"
    tree = Hierarchy.from_leaves(
        ["Bags/a", "Bags/b", "bags/c", "bags/d", "Parent/e", "Parent/f", "BIN/g", "BIN/h"]
        + [f"{composed}/i", f"{composed}/j", f"{decomposed}/k", f"{decomposed}/l"]
    )
    assert tree.folders["Bags"] == "Bags" and tree.folders["bags"] == "bags_2"
    assert tree.folders["Parent"] == "Parent_2" and tree.folders["BIN"] == "BIN_2"
    assert {tree.folders[composed], tree.folders[decomposed]} == {decomposed, f"{composed}_2"}
    keys = [unicodedata.normalize("NFC", f).casefold() for f in tree.folders.values()]
    assert len(set(keys)) == len(keys)
