"""Feeding images: files or bytes in order, prepared in worker processes, one error per bad source;
collecting the inputs of `predict`."""

import io

import pytest
import torch
from conftest import write_image
from PIL import Image, ImageOps

from lcpn.feed import PICTURE, InputError, PerImage, collect_images, feed, source_name
from lcpn.images import ImageError, open_rgb
from lcpn.transforms import DataConfig, Mirrored, eval_transform


def png_bytes(colour):
    buf = io.BytesIO()
    Image.new("RGB", (6, 4), colour).save(buf, format="PNG")
    return buf.getvalue()


def red_and_index(picture, index):
    """A ``feed`` prepare: a tensor and a plain value, as a worker process makes them."""
    return {"red": torch.tensor(picture.getpixel((1, 1))[0]), "index": index}


@pytest.mark.parametrize(("batch_size", "workers"), [(1, 0), (2, 2), (3, 1), (64, 2)])
def test_feed_keeps_the_order_and_gives_one_error_per_bad_file(tmp_path, batch_size, workers):
    sources = [write_image(tmp_path / f"{i}.png", colour=(i * 40, 0, 0)) for i in range(5)]
    (tmp_path / "text.jpg").write_text("not a picture")
    sources.insert(1, tmp_path / "text.jpg")
    sources.insert(4, tmp_path / "missing.jpg")
    batches = list(feed(sources, batch_size, red_and_index, workers))
    assert [len(b.indices) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
    assert [i for b in batches for i in b.indices] == list(range(len(sources)))
    errors = {i: str(e) for b in batches for i, e in b.errors.items()}
    assert errors == {1: "not an image file", 4: "cannot read file (No such file or directory)"}
    # a bad file never stops its batch: the others' values are there, in order, tensors stacked
    opened = [i for b in batches for i in b.opened]
    assert opened == [0, 2, 3, 5, 6]
    assert [r for b in batches if b.opened for r in b.inputs["red"].tolist()] == [0, 40, 80, 120, 160]
    assert [i for b in batches if b.opened for i in b.inputs["index"]] == opened


def test_feed_of_nothing_yields_nothing():
    assert list(feed([], 4)) == []


def test_feed_hands_back_the_pictures_by_default(tmp_path):
    sources = [write_image(tmp_path / f"{i}.png", colour=(i * 40, 0, 0)) for i in range(3)]
    pictures = [p for b in feed(sources, 2, workers=2) for p in b.inputs[PICTURE]]
    assert [p.mode for p in pictures] == ["RGB"] * 3 and [p.getpixel((1, 1))[0] for p in pictures] == [0, 40, 80]


@pytest.mark.parametrize("workers", [0, 2])
def test_feed_takes_uploaded_bytes_beside_files(tmp_path, workers):
    sources = [png_bytes((10, 20, 30)), write_image(tmp_path / "f.png", colour=(50, 0, 0)), b"garbage"]
    batches = list(feed(sources, 2, workers=workers))
    first, second = batches[0].inputs[PICTURE]
    assert first.getpixel((0, 0)) == (10, 20, 30) and first.size == (6, 4)
    assert second.getpixel((1, 1))[0] == 50
    assert batches[1].opened == [] and isinstance(batches[1].errors[2], ImageError)


def test_worker_processes_give_the_tensors_of_the_calling_process(tmp_path):
    sources = [write_image(tmp_path / f"{i}.jpg", size=40 + i) for i in range(7)]
    sources.insert(3, b"\xff\xd8\xff not a JPEG")
    config = DataConfig(32, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    prepare = PerImage({"pixels": eval_transform(config), "mirrored": Mirrored(eval_transform(config))})

    def run(workers):
        batches = list(feed(sources, 3, prepare, workers))
        stacked = {k: torch.cat([b.inputs[k] for b in batches]) for k in ("pixels", "mirrored")}
        return [b.opened for b in batches], stacked

    in_process, in_workers = run(0), run(2)
    assert in_process[0] == in_workers[0] == [[0, 1, 2], [4, 5], [6, 7]]
    for key in ("pixels", "mirrored"):
        assert in_workers[1][key].shape == (7, 3, 32, 32)
        assert torch.equal(in_process[1][key], in_workers[1][key])
    expected = torch.stack([eval_transform(config)(open_rgb(s)) for s in sources if not isinstance(s, bytes)])
    assert torch.equal(in_workers[1]["pixels"], expected)
    assert torch.equal(
        in_workers[1]["mirrored"],
        torch.stack(
            [eval_transform(config)(ImageOps.mirror(open_rgb(s))) for s in sources if not isinstance(s, bytes)]
        ),
    )


def test_the_embedding_pass_gives_the_same_embeddings_in_workers(tmp_path):
    from lcpn.config import TrainConfig
    from lcpn.embedding_store import EmbeddingStore
    from lcpn.features import embed_images, open_backbone

    paths = [str(write_image(tmp_path / f"{i}.jpg", size=24 + 3 * i)) for i in range(5)]
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff cut")
    paths.insert(2, str(tmp_path / "bad.jpg"))
    views = {p: 3 if i % 2 else 1 for i, p in enumerate(paths)}  # crops too, and a different count per image
    backbone, key = open_backbone(TrainConfig(mode="features", backbone="efficientnet-lite0", image_size=32,
                                              device="cpu"))  # fmt: skip
    embedded = [embed_images(paths, backbone, EmbeddingStore(tmp_path / f"store{w}", key), views, 2, w) for w in (0, 2)]
    assert embedded[0].keys() == embedded[1].keys() == set(paths) - {str(tmp_path / "bad.jpg")}
    for p, e in embedded[0].items():
        assert e.shape == (views[p], backbone.embedder.dim)
        assert torch.allclose(e, embedded[1][p], atol=1e-5)
    assert not torch.allclose(embedded[0][paths[1]][0], embedded[0][paths[1]][2])  # a crop is another view


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
