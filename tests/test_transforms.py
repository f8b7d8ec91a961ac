import json

import numpy as np
import pytest
import torch
from PIL import Image

from lcpn.artefacts import safe_unpickle, write_pickle
from lcpn.transforms import DataConfig, eval_transform, inv_normalize, train_transform

CFG = DataConfig(image_size=16, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


def picture(width: int = 40, height: int = 20) -> Image.Image:
    """Left half red, right half blue, so a crop or a flip shows."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[:, : width // 2] = (255, 0, 0)
    arr[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(arr)


def test_data_config_survives_json():
    assert DataConfig.from_dict(json.loads(json.dumps(CFG.to_dict()))) == CFG


def test_eval_squashes_the_whole_picture_and_normalises():
    x = eval_transform(CFG)(picture())
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    pixels = inv_normalize(CFG)(x)
    # nothing is cropped away: the left edge is still red and the right edge still blue
    assert torch.allclose(pixels[:, :, 0].mean(1), torch.tensor([1.0, 0.0, 0.0]), atol=0.02)
    assert torch.allclose(pixels[:, :, -1].mean(1), torch.tensor([0.0, 0.0, 1.0]), atol=0.02)


def test_a_picture_of_the_mean_colour_normalises_to_zero():
    mean = Image.new("RGB", (5, 5), tuple(round(m * 255) for m in CFG.mean))
    assert eval_transform(CFG)(mean).abs().max() < 0.02


def test_inv_normalize_undoes_the_normalisation():
    x = torch.rand(3, 16, 16)
    normalised = (x - torch.tensor(CFG.mean)[:, None, None]) / torch.tensor(CFG.std)[:, None, None]
    assert torch.allclose(inv_normalize(CFG)(normalised), x, atol=1e-6)


def test_training_without_augmentation_is_the_eval_transform():
    assert torch.equal(train_transform(CFG, augment=False)(picture()), eval_transform(CFG)(picture()))


def test_augmentation_is_random_but_seeded():
    def views(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        augment = train_transform(CFG)
        return [augment(picture()) for _ in range(4)]

    first, again = views(0), views(0)
    assert all(v.shape == (3, 16, 16) for v in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(first[0], v) for v in first[1:])


@pytest.mark.parametrize("make", [eval_transform, inv_normalize])
def test_transforms_load_back_through_the_restricted_unpickler(tmp_path, make):
    write_pickle(tmp_path / "t.pickle", make(CFG))
    loaded = safe_unpickle(tmp_path / "t.pickle")
    x = picture() if make is eval_transform else torch.rand(3, 4, 4)
    assert torch.equal(loaded(x), make(CFG)(x))


@pytest.mark.parametrize("square", ["squash", "letterbox", "crop"])
def test_every_square_mode_round_trips_through_the_restricted_unpickler(tmp_path, square):
    cfg = DataConfig(16, (0.5,) * 3, (0.5,) * 3, square)
    assert DataConfig.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "t.pickle"
    write_pickle(path, eval_transform(cfg))
    picture = Image.new("RGB", (30, 60), (0, 0, 0))
    assert torch.equal(safe_unpickle(path)(picture), eval_transform(cfg)(picture))


def test_square_modes_treat_a_tall_picture_differently():
    """A black 1:2 picture: squash keeps it black, letterbox adds white sides, crop keeps black."""
    picture = Image.new("RGB", (30, 60), (0, 0, 0))
    x = {m: eval_transform(DataConfig(16, (0.0,) * 3, (1.0,) * 3, m))(picture) for m in ("squash", "letterbox", "crop")}
    assert x["squash"].max() == 0 and x["crop"].max() == 0
    assert x["letterbox"][:, :, 0].min() == 1.0 and x["letterbox"][:, :, 8].max() == 0  # white sides, black centre
    assert all(v.shape == (3, 16, 16) for v in x.values())


def test_folders_without_a_square_mode_squash_and_unknown_modes_are_refused():
    assert DataConfig.from_dict({"image_size": 8, "mean": [0] * 3, "std": [1] * 3}).square == "squash"
    with pytest.raises(ValueError, match="unknown square mode 'stretch'"):
        DataConfig(8, (0.0,) * 3, (1.0,) * 3, "stretch")


def bands(width: int = 60, height: int = 20) -> Image.Image:
    """A wide picture: red, green and blue thirds."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    for i in range(3):
        arr[:, i * width // 3 : (i + 1) * width // 3, i] = 255
    return Image.fromarray(arr)


def test_training_views_are_crops_of_the_eval_square_that_keep_the_whole_picture():
    """Squashed, each band is a third of the eval square; every training view shows all three bands
    at about that width (a crop of the raw 3:1 picture, as before, could never hold all three)."""
    cfg = DataConfig(30, (0.0,) * 3, (1.0,) * 3, "squash")
    eval_shares = torch.bincount(eval_transform(cfg)(bands()).mean(1).argmax(0), minlength=3) / 30
    assert torch.allclose(eval_shares, torch.full((3,), 1 / 3), atol=0.04)
    torch.manual_seed(0)
    augment = train_transform(cfg)
    for _ in range(20):
        shares = torch.bincount(augment(bands()).mean(1).argmax(0), minlength=3) / 30  # dominant colour per column
        assert shares.min() > 0.15 and shares.max() < 0.45


def test_a_letterboxed_model_trains_on_padded_squares():
    cfg = DataConfig(30, (0.0,) * 3, (1.0,) * 3, "letterbox")
    tall = Image.new("RGB", (20, 60), (0, 0, 0))  # padded with white thirds on either side
    torch.manual_seed(0)
    augment = train_transform(cfg)
    for _ in range(20):
        x = augment(tall)
        assert x[:, :, 0].min() > 0.7 and x[:, :, -1].min() > 0.7 and x[:, :, 15].max() < 0.3
