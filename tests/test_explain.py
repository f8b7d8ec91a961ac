"""Grad-CAM per stage: the heatmap's frame, every kind of backbone network, and `lcpn explain`."""

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write_image
from folders import model_folder
from PIL import Image

from lcpn.cascade import Cascade
from lcpn.cli import main
from lcpn.explain import Explainer, to_picture_frame
from lcpn.transforms import DataConfig

SIZE = 64


def middle_band(size: int = SIZE) -> np.ndarray:
    """1 on the middle half of the rows of a square map, 0 above and below."""
    square = np.zeros((size, size), dtype=np.float32)
    square[size // 4 : 3 * size // 4] = 1
    return square


def test_a_letterboxed_picture_gets_back_the_part_of_the_map_it_filled():
    data = DataConfig(SIZE, (0.5,) * 3, (0.5,) * 3, "letterbox")
    frame = to_picture_frame(middle_band(), data, (200, 100))  # a wide picture fills the middle rows
    assert frame.shape == (100, 200) and frame[5:-5].min() > 0.9


def test_a_cropped_picture_is_cold_where_the_network_did_not_look():
    data = DataConfig(SIZE, (0.5,) * 3, (0.5,) * 3, "crop")
    frame = to_picture_frame(np.ones((SIZE, SIZE), np.float32), data, (200, 100))  # the centre 100 x 100 seen
    assert frame.shape == (100, 200)
    assert frame[:, :45].max() == 0 and frame[:, 155:].max() == 0 and frame[:, 55:145].min() > 0.9


def test_a_squashed_picture_stretches_the_map():
    data = DataConfig(SIZE, (0.5,) * 3, (0.5,) * 3, "squash")
    frame = to_picture_frame(middle_band(), data, (30, 200))
    assert frame.shape == (200, 30) and frame[60:140].min() > 0.9 and frame[:40].max() < 0.1


@pytest.mark.parametrize(("name", "mode"), [("efficientnet-b0", "finetune"), ("efficientnet-lite0", "features")])
def test_grad_cam_reads_the_last_stage_of_both_network_families_in_both_modes(name, mode, tmp_path):
    models = model_folder(tmp_path, ["x", "y"], mode=mode, backbone=name)
    explainer = Explainer(Cascade.load(models, "cpu"), models)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8))
    heatmaps = [explainer.heatmap("", picture, c) for c in (0, 1)]
    for heatmap in heatmaps:
        assert heatmap.shape == (48, 80) and heatmap.min() >= 0 and heatmap.max() <= 1
    node = explainer.cascade.nodes[""]
    frozen = node.network if mode == "finetune" else node.backbone.embedder
    assert not any(p.requires_grad for p in frozen.parameters())  # no weight gradients are kept


def test_lcpn_explain_writes_a_png_per_stage_and_a_contact_sheet(tmp_path):
    models = model_folder(tmp_path / "models", ["a/x", "a/y", "b/u", "b/v", "c/only"], mode="features")
    images = [write_image(tmp_path / "in" / f"{i}.png", size=24) for i in range(2)]
    (tmp_path / "in" / "broken.jpg").write_bytes(b"not a picture")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["explain", str(tmp_path / "in"), "--models", str(models), "--out", str(out),
                                       "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "broken.jpg  ERROR: not an image file" in result.output
    assert (out / "contact_sheet.png").is_file()
    cascade = Cascade.load(models, "cpu")
    for image, folder in zip(images, sorted(p for p in out.iterdir() if p.is_dir())):
        path = cascade.predict_batch([Image.open(image).convert("RGB")])[0].path
        stages = sorted(folder.glob("stage*.png"))
        assert [p.name for p in stages] == [f"stage{i}_{name}.png" for i, name in enumerate(path, 1)]
        assert all(Image.open(p).size[0] > 100 for p in stages)
