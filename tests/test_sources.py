import os
from pathlib import Path

import pytest
from conftest import make_tree, write_image

from lcpn.sources import SourceError, scan_csv, scan_tree


def reasons(excluded) -> dict[str, str]:
    return {e.path: e.reason for e in excluded}


def test_a_symlink_loop_is_followed_once_and_reported(tmp_path):
    root = make_tree(tmp_path / "data", {"A": 2, "B": 2})
    (root / "A" / "loop").symlink_to("..")
    items, excluded = scan_tree(root)
    assert sorted((Path(i.path).relative_to(root).as_posix(), i.leaf) for i in items) == [
        ("A/img_0.png", "A"),
        ("A/img_1.png", "A"),
        ("B/img_0.png", "B"),
        ("B/img_1.png", "B"),
    ]
    assert reasons(excluded) == {str(root / "A" / "loop"): f"a link to '{root}', a folder scanned only once"}


def test_a_second_link_to_a_class_folder_is_not_scanned_twice(tmp_path):
    root = make_tree(tmp_path / "data", {"bags/tote": 2, "shoes": 2})
    (root / "bags" / "also_tote").symlink_to(root / "bags" / "tote")
    items, excluded = scan_tree(root)
    assert sorted({i.leaf for i in items}) == ["bags/tote", "shoes"]
    assert len(items) == 4
    tote = root / "bags" / "tote"
    assert reasons(excluded) == {str(root / "bags" / "also_tote"): f"a link to '{tote}', a folder scanned only once"}


def test_a_folder_named_like_an_image_is_reported_and_its_class_keeps_its_images(tmp_path):
    root = make_tree(tmp_path / "data", {"bags": 3, "shoes": 3})
    write_image(root / "bags" / "x.jpg" / "inner.png")
    items, excluded = scan_tree(root)
    assert sum(i.leaf == "bags" for i in items) == 3
    assert reasons(excluded) == {str(root / "bags" / "x.jpg"): "a folder named like an image file (not scanned)"}


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_paths_outside_the_image_root_are_refused(tmp_path):
    images = tmp_path / "images"
    for name in ("a.jpg", "b.jpg", "sub/c.jpg"):
        write_image(images / name)
    secret = write_image(tmp_path / "elsewhere" / "secret.jpg")
    labels = write_csv(
        images / "labels.csv",
        f"path,l1\na.jpg,x\nb.jpg,y\nsub/../sub/c.jpg,y\n../elsewhere/secret.jpg,x\n{secret},y\n../../etc/shadow,x\n",
    )
    items, excluded = scan_csv(labels, ["l1"])
    assert sorted(Path(i.path).name for i in items) == ["a.jpg", "b.jpg", "c.jpg"]
    outside = f"outside the image root '{images}' (not opened)"
    assert reasons(excluded) == {
        "../elsewhere/secret.jpg": f"labels.csv line 5: {outside}",
        str(secret): f"labels.csv line 6: {outside}",
        "../../etc/shadow": f"labels.csv line 7: {outside}",
    }


def test_csv_duplicate_rows_are_kept_once_and_reported(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        write_image(tmp_path / name)
    labels = write_csv(tmp_path / "l.csv", "path,l1\na.jpg,x\nb.jpg,y\n./a.jpg,x\na.jpg,y\n")
    items, excluded = scan_csv(labels, ["l1"])
    assert sorted((Path(i.path).name, i.leaf) for i in items) == [("a.jpg", "x"), ("b.jpg", "y")]
    assert [(Path(e.path).name, e.reason) for e in excluded] == [
        ("a.jpg", "l.csv line 4: the same file as line 2 (kept once)"),
        ("a.jpg", "l.csv line 5: the same file as line 2, with other labels (line 2 is kept)"),
    ]


def test_csv_labels_with_control_characters_are_refused(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        write_image(tmp_path / name)
    labels = write_csv(tmp_path / "l.csv", 'path,l1,l2\na.jpg,x,p\nb.jpg,"x\nq",p\n\nc.jpg,x,"p\tq"\nd.jpg,x,q\n')
    items, excluded = scan_csv(labels, ["l1", "l2"])
    assert sorted(i.leaf for i in items) == ["x/p", "x/q"]
    assert [(Path(e.path).name, e.reason) for e in excluded] == [
        ("b.jpg", "l.csv line 3: a control character (such as a line break) in l1"),
        ("c.jpg", "l.csv line 6: a control character (such as a line break) in l2"),
    ]


def test_csv_rows_with_every_problem_still_raise_when_nothing_is_left(tmp_path):
    labels = write_csv(tmp_path / "l.csv", "path,l1\n../x.jpg,a\n")
    with pytest.raises(SourceError, match="no usable rows"):
        scan_csv(labels, ["l1"])


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_csv_symlinks_inside_the_image_root_may_point_anywhere(tmp_path):
    target = write_image(tmp_path / "store" / "a.jpg")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").symlink_to(target)
    write_image(tmp_path / "images" / "b.jpg")
    labels = write_csv(tmp_path / "images" / "l.csv", "path,l1\na.jpg,x\nb.jpg,y\n")
    items, excluded = scan_csv(labels, ["l1"])
    assert len(items) == 2 and not excluded
