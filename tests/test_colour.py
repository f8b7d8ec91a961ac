"""The colour histogram: what it measures, and how it joins the features-mode embedding."""

import pytest
import torch
from PIL import Image, ImageOps

from lcpn import artefacts, backbones
from lcpn.cascade import Cascade
from lcpn.colour import LEVELS, ColourHistogram
from lcpn.config import TrainConfig
from lcpn.fsio import read_csv
from lcpn.train import train_nodes
from lcpn.transforms import DataConfig, eval_transform

DATA = DataConfig(128, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
COLOURS = LEVELS**3


def square_on_white(colour: tuple[int, int, int], box=(32, 32, 96, 96)) -> Image.Image:
    picture = Image.new("RGB", (128, 128), "white")
    picture.paste(colour, box)
    return picture


def histogram(*pictures: Image.Image) -> torch.Tensor:
    transform = eval_transform(DATA)
    with torch.no_grad():
        return ColourHistogram(DATA.mean, DATA.std)(torch.stack([transform(p) for p in pictures]))


def grid_index(r: int, g: int, b: int) -> int:
    """The grid colour nearest an RGB triple (grid points at multiples of 255 / (LEVELS - 1))."""
    step = 255 / (LEVELS - 1)
    i, j, k = (round(c / step) for c in (r, g, b))
    return (i * LEVELS + j) * LEVELS + k


@pytest.mark.parametrize("colour", [(200, 0, 0), (0, 0, 128), (0, 128, 0), (64, 64, 64)])
def test_the_histogram_measures_the_product_and_leaves_out_the_white_background(colour):
    h = histogram(square_on_white(colour))[0]
    shares, mean, area = h[:COLOURS], h[COLOURS : COLOURS + 3], h[-1]
    assert h.shape == (COLOURS + 4,)
    assert area.item() == pytest.approx(0.25, abs=0.02)  # the square covers a quarter of the picture
    assert shares.sum().item() == pytest.approx(1.0, abs=1e-5)  # shares of the product's pixels only
    assert shares.argmax().item() == grid_index(*colour)
    assert mean.tolist() == pytest.approx([c / 255 for c in colour], abs=0.02)


def test_the_histogram_tells_a_red_shoe_from_a_black_one_and_ignores_where_it_stands():
    red, black, red_elsewhere = histogram(
        square_on_white((200, 0, 0)), square_on_white((10, 10, 10)), square_on_white((200, 0, 0), (0, 64, 64, 128))
    )
    assert torch.allclose(red, red_elsewhere, atol=1e-5)
    assert (red - black).abs().sum() > 1.5  # the shares moved from one end of the grid to the other
    mirrored = histogram(ImageOps.mirror(square_on_white((200, 0, 0), (0, 10, 50, 100))))
    assert torch.allclose(mirrored, histogram(square_on_white((200, 0, 0), (0, 10, 50, 100))), atol=1e-5)


def test_a_white_picture_has_no_product_and_no_nan():
    h = histogram(Image.new("RGB", (64, 64), "white"))[0]
    assert torch.isfinite(h).all() and h.abs().sum().item() == 0


def test_the_embedder_puts_the_histogram_first_and_keeps_float32_under_bf16():
    network = backbones.build("efficientnet-lite0", 0).eval()
    colour = ColourHistogram(DATA.mean, DATA.std)
    embedder = backbones.Embedder(network, 2, colour)
    x = torch.stack([eval_transform(DATA)(square_on_white((0, 128, 0)))])
    with torch.no_grad():
        plain = backbones.Embedder(network, 2)(x)
        both = embedder(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = embedder(x)
    assert both.shape == (1, embedder.dim) == (1, COLOURS + 4 + plain.shape[1])
    assert torch.equal(both[:, : COLOURS + 4], colour(x)) and torch.allclose(both[:, COLOURS + 4 :], plain)
    assert fast.dtype == torch.float32 and torch.equal(fast[:, : COLOURS + 4], colour(x))


def test_colour_features_are_trained_recorded_and_predicted_with(split, tmp_path):
    config = TrainConfig(mode="features", backbone="efficientnet-lite0", image_size=32, batch_size=8, workers=0,
                         device="cpu", cache=str(tmp_path / "cache"), head="linear", colour_features=True)  # fmt: skip
    models = tmp_path / "models"
    train_nodes(split, models, config)
    backbone = artefacts.read_info(models / "backbone")
    assert backbone.config["colour_features"] is True
    assert artefacts.read_info(models / "parent").head["in_features"] == COLOURS + 4 + 192 + 320 + 1280
    # the histograms have a store of their own beside the backbone's, which stays the one without colour
    stores = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir() if p.is_dir())
    assert stores == ["colour", "efficientnet"]
    shards = sorted((tmp_path / "cache").rglob("shard-*.npy"))
    train_nodes(split, tmp_path / "plain", config.replace(colour_features=False))
    assert sorted((tmp_path / "cache").rglob("shard-*.npy")) == shards  # nothing embedded again
    assert artefacts.read_info(tmp_path / "plain" / "backbone").config["colour_features"] is False

    cascade = Cascade.load(models, "cpu")
    shared = next(iter(cascade.nodes.values())).backbone
    paths = [r["path"] for r in read_csv(split / "test.csv")]
    x = torch.stack([shared.transform(Image.open(p).convert("RGB")) for p in paths])
    embedded = shared.embed(x)
    assert torch.allclose(embedded[:, : COLOURS + 4], ColourHistogram(shared.data.mean, shared.data.std)(x))
    assert all(p.error is None and p.path for p in cascade.predict(paths, batch_size=4))
