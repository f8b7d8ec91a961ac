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
