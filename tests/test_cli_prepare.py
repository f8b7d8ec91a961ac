import errno
import json

import pytest
from click.testing import CliRunner
from conftest import make_tree, product_photo, write_image

from lcpn import fsio
from lcpn.cli import main
from lcpn.fsio import read_csv


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_usage_error(result, *words):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1, result.output
    for word in words:
        assert word in error_lines[0]


def test_version_and_help():
    assert run("--version").output.startswith("lcpn, version")
    help_text = run("prepare", "--help").output
    for option in (
        "--out",
        "--val",
        "--test",
        "--seed",
        "--min-images",
        "--csv",
        "--levels",
        "--materialize",
    ):
        assert option in help_text


@pytest.mark.parametrize(
    ("leaves", "parents"),
    [
        ({"cat": 6, "dog": 6}, ["parent"]),
        ({"a/x": 6, "a/y": 6, "b/z": 6, "b/w": 6}, ["parent", "a", "b"]),
        ({"a/x/p": 6, "a/x/q": 6, "a/y": 6, "b": 6}, ["parent", "a", "a/x"]),
    ],
)
def test_trees_of_depth_one_to_three(tmp_path, leaves, parents):
    make_tree(tmp_path / "data", leaves)
    result = run("prepare", tmp_path / "data", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    tree = json.loads((tmp_path / "out" / "hierarchy.json").read_text())
    assert sorted(v["folder"] for v in tree["nodes"].values() if "folder" in v) == sorted(parents)
    for folder in parents:
        assert read_csv(tmp_path / "out" / folder / "train.csv")
    test_rows = read_csv(tmp_path / "out" / "test.csv")
    assert {r["label_path"] for r in test_rows} == set(leaves)
    assert "Split written to" in result.output


def test_unicode_spaces_and_repeated_names(tmp_path):
    make_tree(
        tmp_path / "data",
        {"Mäntel & Jacken/Größe L": 6, "Mäntel & Jacken/Other": 6, "日本/Other": 6, "日本/着物": 6},
    )
    result = run("prepare", tmp_path / "data", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    rows = read_csv(tmp_path / "out" / "日本" / "train.csv")
    assert {r["label"] for r in rows} == {"Other", "着物"}
    leaves = {r["label_path"] for r in read_csv(tmp_path / "out" / "test.csv")}
    assert leaves == {"Mäntel & Jacken/Größe L", "Mäntel & Jacken/Other", "日本/Other", "日本/着物"}


def test_csv_source_builds_three_levels_and_reports_bad_rows(tmp_path):
    images = tmp_path / "imgs"
    lines = ["file,l1,l2,l3,extra"]
    for i, labels in enumerate([("A", "x", "p"), ("A", "x", "q"), ("A", "y", "r"), ("B", "z", "s")] * 5):
        write_image(images / f"{i}.jpg")
        lines.append(f"{i}.jpg,{','.join(labels)},1")
    lines += ["20.jpg,A,,p,1", "missing.jpg,A,x,p,1", ",A,x,p,1"]
    write_image(images / "20.jpg")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    result = run(
        "prepare",
        "--csv",
        tmp_path / "labels.csv",
        "--levels",
        "l1,l2,l3",
        "--path-column",
        "file",
        "--image-root",
        images,
        "--out",
        tmp_path / "out",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["tree"]["depth"] == 3
    reasons = [e["reason"] for e in summary["excluded"]]
    assert "labels.csv line 22: empty label in l2" in reasons
    assert "labels.csv line 23: file not found" in reasons
    assert "empty 'file'" in reasons
    assert summary["images"]["kept"] == 20


def test_too_small_leaves_and_duplicates_in_summary(tmp_path):
    root = make_tree(tmp_path / "data", {"a": 10, "b": 10, "tiny": 2})
    (root / "a" / "copy.png").write_bytes((root / "a" / "img_0.png").read_bytes())
    result = run("prepare", root, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "Leaves too small to split" in result.output and "tiny: 2 image(s)" in result.output
    assert "copy.png = img_0.png" in result.output


@pytest.mark.parametrize(
    ("setup", "args", "words"),
    [
        (lambda p: None, ["{p}/nope"], ["does not exist"]),
        (lambda p: (p / "empty").mkdir(), ["{p}/empty"], ["no images found"]),
        (lambda p: make_tree(p / "one", {"only": 5}), ["{p}/one"], ["at least two classes"]),
        (
            lambda p: (p / "l.csv").write_text("path,a\nx.jpg,1\n"),
            ["--csv", "{p}/l.csv", "--levels", "a,b"],
            ["no column 'b'", "path, a"],
        ),
        (lambda p: None, ["--csv", "{p}/l.csv"], ["--levels"]),
        (lambda p: None, [], ["SOURCE"]),
        (
            lambda p: make_tree(p / "d", {"a": 3, "b": 3}),
            ["{p}/d", "--val", "0.6", "--test", "0.5"],
            ["--val"],
        ),
    ],
)
def test_user_errors_are_one_sentence_with_exit_code_2(tmp_path, setup, args, words):
    setup(tmp_path)
    result = run("prepare", *[a.format(p=tmp_path) for a in args], "--out", tmp_path / "out")
    assert_usage_error(result, *words)


def test_a_full_disk_is_one_sentence_and_the_old_split_stays(tmp_path, monkeypatch):
    make_tree(tmp_path / "data", {"a": 6, "b": 6})
    assert run("prepare", tmp_path / "data", "--out", tmp_path / "out").exit_code == 0
    old = (tmp_path / "out" / "images.csv").read_bytes()

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(fsio, "write_bytes", full)
    result = run("prepare", tmp_path / "data", "--out", tmp_path / "out", "--seed", "3")
    assert_usage_error(result, "no space left on the disk that holds", str(tmp_path / "out"))
    assert (tmp_path / "out" / "images.csv").read_bytes() == old


def test_an_out_folder_with_other_files_is_refused(tmp_path):
    make_tree(tmp_path / "data", {"a": 6, "b": 6})
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("years of work")
    result = run("prepare", tmp_path / "data", "--out", tmp_path / "home")
    assert_usage_error(result, "holds other files and no split")
    assert (tmp_path / "home" / "thesis.tex").is_file()


def test_near_identical_pictures_are_listed(tmp_path):
    root = make_tree(tmp_path / "data", {"a": 6, "b": 6})
    product_photo((200, 30, 30)).save(root / "a" / "shoe.png")
    product_photo((200, 30, 30)).resize((96, 128)).save(root / "a" / "shoe_small.jpg", quality=95)
    result = run("prepare", root, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "Groups of near-identical pictures" in result.output
    assert "shoe.png ~ shoe_small.jpg" in result.output
