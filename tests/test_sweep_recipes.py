"""scripts/sweep_recipes.py's crop options: they reach lcpn's training crops, and only where crops are made."""

from __future__ import annotations

from unittest import mock

import pytest
import torchvision.transforms as T
from conftest import import_script

from lcpn import transforms
from lcpn.config import TrainConfig
from lcpn.transforms import DataConfig, train_transform


@pytest.fixture(scope="module")
def sweep():
    return import_script("sweep_recipes")


def crop_of(transform: T.Compose) -> T.RandomResizedCrop:
    return next(t for t in transform.transforms if isinstance(t, T.RandomResizedCrop))


def test_a_recipes_crop_options_shape_the_training_crops_of_its_embedding_pass(sweep):
    data = DataConfig(32, (0.5,) * 3, (0.5,) * 3, "squash")
    assert sweep.crop_settings({}) == (transforms.TRAIN_CROP_SCALE, transforms.TRAIN_CROP_RATIO)
    scale, ratio = sweep.crop_settings({"crop_scale": 0.5, "crop_ratio": 0.75})
    assert scale == (0.5, 1.0) and ratio == pytest.approx((0.75, 4 / 3))
    with mock.patch.multiple(transforms, TRAIN_CROP_SCALE=scale, TRAIN_CROP_RATIO=ratio):
        crop = crop_of(train_transform(data))
    assert crop.scale == (0.5, 1.0) and crop.ratio == pytest.approx((0.75, 4 / 3))
    assert crop_of(train_transform(data)).scale == transforms.TRAIN_CROP_SCALE  # lcpn's own once the recipe ends


@pytest.mark.parametrize("views", [1, 2])
def test_crop_options_are_refused_where_no_view_is_a_crop(sweep, views):
    with pytest.raises(SystemExit, match="add views=3"):
        sweep.run_recipe("wide", {"views": views}, {"crop_scale": 0.5}, None, None, {}, {})


def test_recipes_share_an_embedding_pass_only_where_its_pixels_and_network_are_the_same(sweep):
    def key(**options):
        config = TrainConfig(**{"mode": "features", **options}).resolved()
        return sweep.pass_key(config, config.backbone, sweep.crop_settings({}))

    assert key() == key(head="linear", stage_features=0, test_flips=False)  # heads and slices: one pass
    for other in ({"image_size": 300}, {"square": "crop"}, {"views": 4}, {"precision": "bf16"},
                  {"colour_features": True}, {"weights": "other.pth"}):  # fmt: skip
        assert key(**other) != key(), other
