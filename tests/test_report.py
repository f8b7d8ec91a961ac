import pytest
from conftest import write_image

from lcpn.report import REPORT_FILES, Outcome, format_table, write_node_report

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def outcome(tmp_path):
    paths = [str(write_image(tmp_path / "img" / f"{i}.png", size=16)) for i in range(4)]
    return Outcome(["cat", "dog"], paths, [0, 0, 1, 1], [0, 1, 1, 0], [0.9, 0.8, 0.7, 0.6])


def test_node_report_writes_the_text_and_four_real_plots(tmp_path, outcome):
    history = [
        {"epoch": 1, "train_loss": 0.9, "train_acc": 0.5, "val_loss": 0.8, "val_acc": 0.5, "best": True},
        {"epoch": 2, "train_loss": 0.5, "train_acc": 0.8, "val_loss": 0.9, "val_acc": 0.25, "best": False},
    ]
    metrics = write_node_report(tmp_path / "node", "pets", outcome, history, {"train": [5, 3], "val": [2, 2]})
    for name in REPORT_FILES:
        assert (tmp_path / "node" / name).stat().st_size > 1000 or name == "performance.txt", name
        if name.endswith(".png"):
            assert (tmp_path / "node" / name).read_bytes()[:8] == PNG
    text = (tmp_path / "node" / "performance.txt").read_text()
    assert "evaluated on: val (4 images)" in text and "accuracy: 0.5000 (2 wrong)" in text
    assert metrics["accuracy"] == 0.5 and metrics["n"] == 4 and metrics["per_class"]["dog"]["support"] == 2
    assert not list((tmp_path / "node").glob(".*"))  # no temporaries left


def test_node_report_without_images_and_with_a_regularisation_path(tmp_path):
    empty = Outcome(["a", "b"], [], [], [], [], "train (no val images)")
    history = [{"epoch": i, "C": c, "train_acc": 0.9, "val_acc": 0.8, "best": i == 2} for i, c in ((1, 0.1), (2, 1))]
    metrics = write_node_report(tmp_path, "n", empty, history, {"train": [1, 1], "val": [0, 0]})
    assert metrics == {"accuracy": None, "n": 0}
    assert "No images to evaluate on." in (tmp_path / "performance.txt").read_text()
    assert all((tmp_path / name).read_bytes()[:8] == PNG for name in REPORT_FILES if name.endswith(".png"))


def test_format_table_aligns_and_marks_missing_values():
    lines = format_table([["root", 0.5, None], ["a/long/node", 1.0, 3]], ["node", "acc", "n"]).splitlines()
    assert lines[2].startswith("root ") and "0.5000" in lines[2] and lines[2].rstrip().endswith("-")
    assert len({len(line.rstrip()) for line in lines[:2]}) == 1
