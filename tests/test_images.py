import numpy as np
import pytest
from PIL import Image

from lcpn import images
from lcpn.images import ImageError, check_image, open_rgb


@pytest.mark.parametrize("mode", ["P", "RGBA", "CMYK", "L", "I;16", "LA", "1"])
def test_any_mode_opens_as_rgb(tmp_path, mode):
    base = Image.fromarray(np.random.default_rng(0).integers(0, 255, (6, 5, 3), dtype=np.uint8), "RGB")
    im = Image.new("I;16", (5, 6), 40000) if mode == "I;16" else base.convert(mode)
    path = tmp_path / ("x.tiff" if mode in ("CMYK", "I;16") else "x.png")
    im.save(path)
    out = open_rgb(path)
    assert out.mode == "RGB" and out.size == (5, 6)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 30000, 65535]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "g.png")
    values = np.asarray(open_rgb(tmp_path / "g.png"))[0, :, 0]
    assert values[0] == 0 and values[2] == 255 and 100 < values[1] < 130


def test_transparent_pixels_become_white(tmp_path):
    Image.new("RGBA", (3, 3), (10, 20, 30, 0)).save(tmp_path / "t.png")
    assert np.asarray(open_rgb(tmp_path / "t.png"))[1, 1].tolist() == [255, 255, 255]


def test_jpeg_with_an_exif_thumbnail_is_not_taken_for_truncated(tmp_path):
    thumb = tmp_path / "thumb.jpg"
    Image.new("RGB", (8, 8), "blue").save(thumb)
    exif = Image.Exif()
    exif[0x0112] = 1
    im = Image.fromarray(np.random.default_rng(2).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    im.save(tmp_path / "full.jpg", exif=exif.tobytes() + thumb.read_bytes())
    assert check_image(tmp_path / "full.jpg") is None


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (10, 4), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    im.save(tmp_path / "o.jpg", exif=exif)
    assert open_rgb(tmp_path / "o.jpg").size == (4, 10)


def test_bad_files_give_reasons(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("not a picture")
    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbled.jpg").write_bytes(data[:200] + bytes(range(256)) * 4)
    (tmp_path / "tail_cut.jpg").write_bytes(data[: len(data) - 300])  # libjpeg alone only warns
    assert check_image(tmp_path / "empty.jpg") == "empty file"
    assert check_image(tmp_path / "notes.jpg") == "not an image file"
    assert check_image(tmp_path / "cut.jpg") == "truncated image"
    assert check_image(tmp_path / "tail_cut.jpg") == "truncated image"
    assert check_image(tmp_path / "garbled.jpg") is not None
    assert check_image(tmp_path / "missing.jpg").startswith("cannot read file")
    assert check_image(good) is None


def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    Image.new("L", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 5000)
    with pytest.raises(ImageError, match="decompression bomb"):
        open_rgb(tmp_path / "big.png")


def test_hidden_files():
    from pathlib import Path

    assert images.is_hidden(Path(".DS_Store")) and images.is_hidden(Path("._x.jpg"))
    assert not images.is_hidden(Path("x.jpg"))


def _photo(path, size=64, seed=3):
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=90)
    return path.read_bytes()


@pytest.mark.parametrize(
    "trailer",
    [
        b"\x00\x00\x00\x18ftypmp42" + b"\xff\xda" + bytes(range(256)) * 8,  # a Motion Photo's MP4 after the image
        b"\xff\xd8\xff\xda" + bytes(300),  # an appended thumbnail that is itself cut short
    ],
)
def test_jpeg_with_data_after_the_end_of_image_is_valid(tmp_path, trailer):
    path = tmp_path / "motion.jpg"
    path.write_bytes(_photo(tmp_path / "base.jpg") + trailer)
    assert check_image(path) is None


def test_progressive_jpeg_cut_inside_a_later_scan_is_truncated(tmp_path):
    arr = np.random.default_rng(4).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "p.jpg", progressive=True)
    data = (tmp_path / "p.jpg").read_bytes()
    assert check_image(tmp_path / "p.jpg") is None
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) - 200])
    assert check_image(tmp_path / "cut.jpg") == "truncated image"


def test_open_rgb_accepts_bytes_with_the_same_checks(tmp_path, monkeypatch):
    data = _photo(tmp_path / "x.jpg")
    assert open_rgb(data).size == (64, 64)
    assert np.array_equal(np.asarray(open_rgb(data)), np.asarray(open_rgb(tmp_path / "x.jpg")))
    for bad, reason in [
        (b"", "empty file"),
        (b"not a picture", "not an image file"),
        (data[: len(data) - 300], "truncated image"),
    ]:
        with pytest.raises(ImageError, match=reason):
            open_rgb(bad)
    Image.new("L", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 5000)
    with pytest.raises(ImageError, match="decompression bomb"):
        open_rgb((tmp_path / "big.png").read_bytes())


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_lcpn_limit_alone_decides_below_pillows_hard_limit(tmp_path, monkeypatch):
    Image.new("L", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 20_000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # Pillow only warns up to twice its limit
    assert open_rgb(tmp_path / "big.png").size == (100, 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # and refuses beyond: the same reason
    with pytest.raises(ImageError, match="decompression bomb"):
        open_rgb(tmp_path / "big.png")


def test_open_rgb_leaves_the_process_wide_warning_filters_alone(tmp_path, monkeypatch):
    """The warning filters are shared by all threads; prepare opens images in eight at once."""

    class NoWarningsModule:
        def __getattr__(self, name):
            raise AssertionError(f"open_rgb used warnings.{name}")

    monkeypatch.setattr(images, "warnings", NoWarningsModule(), raising=False)
    _photo(tmp_path / "x.jpg")
    assert open_rgb(tmp_path / "x.jpg").size == (64, 64)
