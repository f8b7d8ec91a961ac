import errno
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import hash_bits, make_tree, product_photo, write_image
from PIL import Image as PILImage

from lcpn import fsio
from lcpn.duplicates import NEAR_DUPLICATE_BITS, THUMBNAIL_MAX_DIFFERENCE, THUMBNAIL_SIZE, perceptual_hash
from lcpn.errors import LcpnError
from lcpn.fsio import DiskFullError, read_csv
from lcpn.hierarchy import Hierarchy
from lcpn.prepare import prepare
from lcpn.sources import scan_tree
from lcpn.split import TEST, TRAIN, VAL, Image, make_split


def _images(counts: dict[str, int]) -> list[Image]:
    return [Image(f"/{leaf}/{i}.jpg", leaf, f"{leaf}-{i}") for leaf, n in counts.items() for i in range(n)]


def test_stratified_by_leaf_with_val_and_test_everywhere():
    result = make_split(_images({"a/x": 50, "a/y": 20, "b": 3}), val=0.2, test=0.1, seed=0)
    for leaf, n in {"a/x": 50, "a/y": 20, "b": 3}.items():
        sides = [result.assignment[f"/{leaf}/{i}.jpg"] for i in range(n)]
        assert sides.count(VAL) == max(1, round(0.2 * n))
        assert sides.count(TEST) == max(1, round(0.1 * n))
        assert sides.count(TRAIN) >= 1


def test_node_views_never_touch_the_test_set():
    result = make_split(_images({"a/x/p": 30, "a/x/q": 30, "a/y": 30, "b": 30}), val=0.2, test=0.2, seed=3)
    test = {p for p, s in result.assignment.items() if s == TEST}
    for node in result.hierarchy.parents:
        for split in (TRAIN, VAL):
            view = result.node_view(node, split)
            assert view, (node, split)
            assert not {im.path for im, _ in view} & test
            assert all(result.hierarchy.child_towards(node, im.leaf) == c for im, c in view)
    # the root sees every train image, labelled with its top-level class
    assert len(result.node_view("", TRAIN)) == sum(s == TRAIN for s in result.assignment.values())


def test_duplicates_land_on_one_side():
    images = _images({"a": 40, "b": 40})
    # ten groups of three byte-identical files in `a`
    images = [
        Image(im.path, im.leaf, f"dup{i % 10}" if im.leaf == "a" and i < 30 else im.sha256)
        for i, im in enumerate(images)
    ]
    for seed in range(5):
        result = make_split(images, val=0.3, test=0.3, seed=seed)
        assert len(result.duplicate_groups) == 10
        for group in result.duplicate_groups:
            assert len({result.assignment[p] for p in group}) == 1


def test_conflicting_duplicates_are_reported():
    images = _images({"a": 5, "b": 5})
    images.append(Image("/b/copy.jpg", "b", "a-0"))
    result = make_split(images, val=0.2, test=0.2)
    assert result.conflicting_duplicates == [["/a/0.jpg (a)", "/b/copy.jpg (b)"]]
    assert result.assignment["/a/0.jpg"] == result.assignment["/b/copy.jpg"]


def test_tiny_leaves_stay_in_train_and_min_images_drops():
    result = make_split(_images({"a": 20, "b": 2, "c": 1, "d": 4}), val=0.2, test=0.1)
    assert result.too_small == {"b": 2, "c": 1}
    assert {result.assignment[f"/b/{i}.jpg"] for i in range(2)} == {TRAIN}
    dropped = make_split(_images({"a": 20, "b": 2, "c": 1, "d": 4}), val=0.2, test=0.1, min_images=3)
    assert dropped.dropped == {"b": 2, "c": 1}
    assert dropped.hierarchy == Hierarchy.from_leaves(["a", "d"])


def test_seed_changes_the_split_and_is_deterministic():
    images = _images({"a": 30, "b": 30})
    one, two = make_split(images, 0.2, 0.1, seed=1), make_split(list(reversed(images)), 0.2, 0.1, seed=1)
    assert one.assignment == two.assignment
    assert make_split(images, 0.2, 0.1, seed=2).assignment != one.assignment


def test_same_input_and_seed_give_byte_identical_output(tree3, tmp_path):
    outputs = []
    for name in ("one", "two"):
        items, excluded = scan_tree(tree3)
        prepare(items, excluded, tmp_path / name, str(tree3), seed=7)
        outputs.append(
            {
                p.relative_to(tmp_path / name): p.read_bytes()
                for p in sorted((tmp_path / name).rglob("*"))
                if p.is_file()
            }
        )
    assert outputs[0] == outputs[1]
    assert len(outputs[0]) == 4 + 2 * 5  # hierarchy, summary, images, test + train/val per parent


def test_prepare_excludes_bad_files_with_reasons(tmp_path):
    root = make_tree(tmp_path / "d", {"a": 5, "b": 5, "c/d": 3, "c/e": 3})
    (root / "a" / "empty.jpg").write_bytes(b"")
    (root / "a" / "notes.txt").write_text("hello")
    (root / "a" / ".DS_Store").write_bytes(b"junk")
    (root / "b" / "._img_0.png").write_bytes(b"junk")
    good = (root / "b" / "img_0.png").read_bytes()
    (root / "b" / "cut.png").write_bytes(good[: len(good) // 2])
    write_image(root / "c" / "stray.png")
    (root / "README.md").write_text("files at the top of the tree belong to no class")
    items, excluded = scan_tree(root)
    result = prepare(items, excluded, tmp_path / "out", str(root))
    reasons = {e.path.rsplit("/", 1)[-1]: e.reason for e in result.excluded}
    assert reasons == {
        "empty.jpg": "empty file",
        "notes.txt": "not an image file",
        "cut.png": reasons["cut.png"],
        "stray.png": "file in a folder that has sub-folders (not a leaf class)",
    }
    assert "truncated" in reasons["cut.png"] or "undecodable" in reasons["cut.png"]
    kept = read_csv(tmp_path / "out" / "images.csv")
    assert len(kept) == 16


def test_materialize_lays_out_class_folders(tree3, tmp_path):
    items, excluded = scan_tree(tree3)
    prepare(items, excluded, tmp_path / "out", str(tree3), materialize="symlink")
    train = tmp_path / "out" / "a" / "x" / "train"
    assert sorted(p.name for p in train.iterdir()) == ["p", "q"]
    links = list((train / "p").iterdir())
    assert links and all(p.is_symlink() and p.resolve().is_file() for p in links)
    rows = read_csv(tmp_path / "out" / "a" / "x" / "train.csv")
    assert len(rows) == sum(len(list((train / c).iterdir())) for c in ("p", "q"))
    shutil.rmtree(tmp_path / "out")


def _flip(phash: str, bits: int, offset: int = 0) -> str:
    """``phash`` with ``bits`` of its bits flipped, from bit ``offset`` on."""
    return f"{int(phash, 16) ^ (((1 << bits) - 1) << offset):016x}"


def test_near_duplicates_land_on_one_side_even_in_a_chain():
    rng = np.random.default_rng(0)
    images = [
        Image(f"/{leaf}/{i}.jpg", leaf, f"{leaf}-{i}", f"{int(h):016x}")
        for leaf in ("a", "b")
        for i, h in enumerate(rng.integers(0, 2**63, 40, dtype=np.uint64))
    ]
    base = images[0].phash
    chain = [base, _flip(base, NEAR_DUPLICATE_BITS), _flip(base, 2 * NEAR_DUPLICATE_BITS)]  # ends 8 bits apart
    images[1:3] = [Image(images[i].path, "a", images[i].sha256, chain[i]) for i in (1, 2)]
    images[3] = Image(images[3].path, "a", images[3].sha256, _flip(base, NEAR_DUPLICATE_BITS + 1, 40))
    images[40] = Image(images[40].path, "b", images[40].sha256, _flip(base, 1, 60))  # same picture, other leaf
    for seed in range(5):
        result = make_split(images, val=0.3, test=0.3, seed=seed)
        assert result.near_duplicate_groups == [["/a/0.jpg", "/a/1.jpg", "/a/2.jpg", "/b/0.jpg"]]
        assert len({result.assignment[p] for p in result.near_duplicate_groups[0]}) == 1
        assert result.conflicting_near_duplicates == [["/a/0.jpg (a)", "/a/1.jpg (a)", "/a/2.jpg (a)", "/b/0.jpg (b)"]]
        assert result.duplicate_groups == []


def test_near_hashes_are_one_picture_only_where_the_thumbnails_agree():
    rng = np.random.default_rng(2)
    hashes = [f"{int(h):016x}" for h in rng.integers(0, 2**63, 30, dtype=np.uint64)]
    thumbs = rng.integers(0, 256, (30, THUMBNAIL_SIZE, THUMBNAIL_SIZE, 3), dtype=np.uint8)
    images = [Image(f"/{i % 2}/{i}.jpg", str(i % 2), f"s{i}", h, {}, t) for i, (h, t) in enumerate(zip(hashes, thumbs))]
    near = np.clip(thumbs[0].astype(int) + 1, 0, 255).astype(np.uint8)  # one picture, re-encoded
    images[2] = Image("/0/2.jpg", "0", "s2", _flip(hashes[0], 2), {}, near)
    images[4] = Image("/0/4.jpg", "0", "s4", hashes[0], {}, 255 - thumbs[0])  # the same hash, another picture
    images[6] = Image("/0/6.jpg", "0", "s6", _flip(hashes[10], 3))  # no thumbnail: the hash alone decides
    result = make_split(images, val=0.2, test=0.2)
    assert sorted(map(sorted, result.near_duplicate_groups)) == [["/0/0.jpg", "/0/2.jpg"], ["/0/10.jpg", "/0/6.jpg"]]


def test_grouping_ten_thousand_hashes():
    rng = np.random.default_rng(1)
    hashes = [f"{int(h):016x}" for h in rng.integers(0, 2**63, 10_000, dtype=np.uint64)]
    hashes[9_999] = _flip(hashes[0], 3)
    images = [Image(f"/{i % 7}/{i}.jpg", str(i % 7), f"s{i}", h) for i, h in enumerate(hashes)]
    result = make_split(images, val=0.2, test=0.1)
    assert result.near_duplicate_groups == [["/0/0.jpg", "/3/9999.jpg"]]


def _snapshot(folder: Path) -> dict:
    if not folder.exists():
        return {}
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _watch_writes(monkeypatch, check) -> list:
    """Call ``check()`` before every file prepare writes: what a kill at that moment would leave."""
    calls = []
    write_text = fsio.write_text

    def watched(path, text):
        calls.append(path)
        check()
        write_text(path, text)

    monkeypatch.setattr(fsio, "write_text", watched)
    return calls


def test_a_prepare_killed_at_any_write_leaves_the_old_split_whole(tree3, tmp_path, monkeypatch):
    out = tmp_path / "out"
    prepare(*scan_tree(tree3), out, str(tree3), seed=1)
    (out / "embeddings").mkdir()
    (out / "embeddings" / "cache.npy").write_bytes(b"features")
    old = _snapshot(out)

    def unchanged():
        assert _snapshot(out) == old

    calls = _watch_writes(monkeypatch, unchanged)
    prepare(*scan_tree(tree3), out, str(tree3), seed=2, materialize="symlink")
    assert len(calls) == 4 + 2 * 5
    new = _snapshot(out)
    assert new != old and new[Path("embeddings/cache.npy")] == b"features"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_a_first_prepare_killed_at_any_write_leaves_no_hierarchy(tree3, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def no_split_yet():
        assert not (out / "hierarchy.json").exists()

    _watch_writes(monkeypatch, no_split_yet)
    prepare(*scan_tree(tree3), out, str(tree3))
    assert (out / "hierarchy.json").is_file()


def test_a_full_disk_keeps_the_old_split_and_names_the_folder(tree3, tmp_path, monkeypatch):
    out = tmp_path / "out"
    prepare(*scan_tree(tree3), out, str(tree3), seed=1)
    old = _snapshot(out)
    calls = []

    def full(path, text):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        path.write_text(text)

    monkeypatch.setattr(fsio, "write_text", full)
    with pytest.raises(DiskFullError, match=re.escape(f"no space left on the disk that holds '{out}'")):
        prepare(*scan_tree(tree3), out, str(tree3), seed=2)
    assert _snapshot(out) == old
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_prepare_replaces_only_a_split_folder(tree3, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(LcpnError, match="holds other files"):
        prepare(*scan_tree(tree3), busy, str(tree3))
    assert (busy / "notes.txt").read_text() == "mine"
    (tree3 / "hierarchy.json").write_text("{}")  # a split folder that holds the images themselves
    with pytest.raises(LcpnError, match="images are inside"):
        prepare(*scan_tree(tree3), tree3, str(tree3))
    assert (tree3 / "a" / "y").is_dir()


def test_near_identical_pictures_stay_together_and_every_image_has_a_perceptual_hash(tmp_path):
    root = make_tree(tmp_path / "data", {"a": 10, "b": 10})
    original = product_photo((200, 30, 30))
    original.save(root / "a" / "big.png")
    original.resize((96, 128)).save(root / "a" / "small.jpg", quality=75)
    product_photo((30, 60, 200)).save(root / "a" / "blue.png")  # a colour variant: its grey layout, its hash too
    assert (
        hash_bits(perceptual_hash(original), perceptual_hash(PILImage.open(root / "a" / "blue.png")))
        <= NEAR_DUPLICATE_BITS
    )
    for seed in range(4):
        result = prepare(*scan_tree(root), tmp_path / "out", str(root), val=0.3, test=0.3, seed=seed)
        group = [str(root / "a" / n) for n in ("big.png", "small.jpg")]
        assert result.split.near_duplicate_groups == [group]
        assert len({result.split.assignment[p] for p in group}) == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["near_duplicate_groups"] == [group]
    assert summary["near_duplicate_max_bits"] == NEAR_DUPLICATE_BITS
    assert summary["near_duplicate_max_thumbnail_difference"] == THUMBNAIL_MAX_DIFFERENCE
    for name in ("images.csv", "test.csv"):
        rows = read_csv(tmp_path / "out" / name)
        assert rows and all(re.fullmatch("[0-9a-f]{16}", r["phash"]) for r in rows)
