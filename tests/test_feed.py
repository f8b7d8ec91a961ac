"""Feeding images: files or bytes in order, one error per bad source; collecting the inputs of `predict`."""

import io

import pytest
from conftest import write_image
from PIL import Image

from lcpn.feed import InputError, collect_images, feed, source_name
from lcpn.images import ImageError


def png_bytes(colour):
    buf = io.BytesIO()
    Image.new("RGB", (6, 4), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(("batch_size", "workers"), [(1, 1), (2, 3), (64, 2)])
def test_feed_keeps_the_order_and_gives_one_error_per_bad_file(tmp_path, batch_size, workers):
    sources = [write_image(tmp_path / f"{i}.png", colour=(i * 40, 0, 0)) for i in range(5)]
    (tmp_path / "text.jpg").write_text("not a picture")
    sources.insert(1, tmp_path / "text.jpg")
    sources.insert(4, tmp_path / "missing.jpg")
    batches = list(feed(sources, batch_size, workers))
    assert [len(b) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
    opened = [o for b in batches for o in b]
    assert len(opened) == len(sources)
    assert [str(o) if isinstance(o, ImageError) else o.getpixel((1, 1))[0] for o in opened] == [
        0, "not an image file", 40, 80, "cannot read file (No such file or directory)", 120, 160,
    ]  # fmt: skip
    assert all(o.mode == "RGB" for o in opened if isinstance(o, Image.Image))


def test_feed_of_nothing_yields_nothing():
    assert list(feed([], 4)) == []


def test_feed_takes_uploaded_bytes_beside_files(tmp_path):
    sources = [png_bytes((10, 20, 30)), write_image(tmp_path / "f.png", colour=(50, 0, 0)), b"garbage"]
    opened = [o for b in feed(sources, 2) for o in b]
    assert opened[0].getpixel((0, 0)) == (10, 20, 30) and opened[0].size == (6, 4)
    assert opened[1].getpixel((1, 1))[0] == 50
    assert isinstance(opened[2], ImageError)


def test_sources_are_named_by_path_or_position():
    assert source_name("a/b.jpg", 0) == "a/b.jpg"
    assert source_name(b"\x89PNG", 2) == "<bytes #3>"


def test_collect_images_searches_folders_and_keeps_named_files(tmp_path):
    shop = tmp_path / "shop"
    for name in ("b.jpg", "a/c.PNG", "a/.hidden/d.jpg", ".e.jpg", "notes.txt"):
        write_image(shop / name) if name.endswith(("jpg", "PNG")) else (shop / name).write_text("x")
    named = tmp_path / "named.bak"
    named.write_bytes(write_image(tmp_path / "named.png").read_bytes())  # named directly: kept whatever its suffix
    missing = tmp_path / "missing.jpg"
    assert collect_images([shop, named, missing]) == [
        str(shop / "a" / "c.PNG"), str(shop / "b.jpg"), str(named), str(missing),
    ]  # fmt: skip


def test_collect_images_refuses_when_nothing_can_be_used(tmp_path):
    with pytest.raises(InputError, match=r"^none of .*missing.jpg, .*gone exists$"):
        collect_images([tmp_path / "missing.jpg", tmp_path / "gone"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"^no image files found in .*empty$"):
        collect_images([tmp_path / "empty"])
