"""`lcpn predict`: inputs, per-image errors, exit codes, and the text / JSON / CSV output."""

import csv
import io
import json
import os

import pytest
import torch
from click.testing import CliRunner
from conftest import write_image
from folders import model_folder

from lcpn.cascade import Prediction
from lcpn.cli import main
from lcpn.output import csv_header, text_line, write_predictions


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return model_folder(tmp_path_factory.mktemp("models"), ["a/x", "a/y", "b/u", "b/v", "c/only"])


def test_predict_cli_usage_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    empty = run("predict", tmp_path / "empty", "--models", tmp_path / "nope")
    assert empty.exit_code == 2 and "no image files found in" in empty.output
    nothing = run("predict", tmp_path / "gone.jpg", tmp_path / "gone", "--models", tmp_path / "nope")
    assert nothing.exit_code == 2 and "Error: none of" in nothing.output and "exists." in nothing.output
    write_image(tmp_path / "x.png")
    no_models = run("predict", tmp_path / "x.png", "--models", tmp_path / "nope")
    assert no_models.exit_code == 2
    assert f"Error: the model folder '{tmp_path / 'nope'}' does not exist." in no_models.output
    not_lcpn = run("predict", tmp_path / "x.png", "--models", tmp_path)
    assert not_lcpn.exit_code == 2 and "not an lcpn model folder (no hierarchy.json)" in not_lcpn.output
    assert "Traceback" not in not_lcpn.output


def test_an_unreadable_or_missing_file_named_is_one_error_among_predictions(models, tmp_path, monkeypatch):
    good = write_image(tmp_path / "good.jpg")
    locked = tmp_path / "locked.jpg"
    locked.write_bytes(b"only its owner may read this")
    readable = os.access
    # Tests may run as root, who reads everything: make the file unreadable as it is to anyone else.
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: not str(p).endswith("locked.jpg") and readable(p, mode))
    result = run("predict", good, locked, tmp_path / "missing.jpg", "--models", models, "--format", "json")
    assert result.exit_code == 1, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["image"] for line in lines] == [str(good), str(locked), str(tmp_path / "missing.jpg")]
    assert lines[0]["error"] is None and len(lines[0]["path"]) == 2
    assert lines[1]["error"] == "not an image file" and lines[1]["path"] == []
    assert lines[2]["error"] == "cannot read file (No such file or directory)"
    assert "2 of 3 image(s) could not be predicted." in result.stderr


def test_a_full_pickled_model_file_is_a_usage_error_in_lcpns_words(models, tmp_path):
    import shutil

    copy = tmp_path / "models"
    shutil.copytree(models, copy)
    torch.save(torch.nn.Linear(2, 2), copy / "a" / "model.pth")
    result = run("predict", write_image(tmp_path / "i.jpg"), "--models", copy)
    assert result.exit_code == 2
    assert result.stderr.endswith(
        f"Error: '{copy / 'a' / 'model.pth'}' is not a plain weights file (it holds pickled objects); "
        "lcpn never loads those.\n"
    )
    assert "weights_only" not in result.output


def test_formats(models, tmp_path):
    images = [write_image(tmp_path / f"{i}.png") for i in range(3)]
    (tmp_path / "bad.png").write_bytes(b"")
    text = run("predict", tmp_path, "--models", models, "--top-k", "2")
    assert text.exit_code == 1
    lines = text.stdout.splitlines()
    assert lines[0].startswith(f"{images[0]}  ") and " > " in lines[0] and "| top-k: " in lines[0]
    assert lines[3] == f"{tmp_path / 'bad.png'}  ERROR: empty file"
    table = list(csv.reader(io.StringIO(run("predict", tmp_path, "--models", models, "--format", "csv").stdout)))
    assert table[0] == csv_header(2) == [
        "image", "level_1", "level_2", "confidence_1", "confidence_2", "path_probability", "stopped_early", "top_k",
        "error",
    ]  # fmt: skip
    assert len(table) == 5 and table[4][0] == str(tmp_path / "bad.png") and table[4][-1] == "empty file"
    assert float(table[1][5]) == pytest.approx(float(table[1][3]) * float(table[1][4]), abs=1e-5)


def test_worker_processes_predict_what_the_calling_process_predicts(models, tmp_path):
    for i in range(5):
        write_image(tmp_path / f"{i}.jpg", size=24)
    (tmp_path / "2b.jpg").write_bytes(b"\xff\xd8\xff cut short")  # a bad file inside a worker's batch
    outputs = [
        run("predict", tmp_path, "--models", models, "--format", "json", "--batch-size", "2", "--workers", w)
        for w in (0, 2)
    ]
    assert outputs[0].exit_code == outputs[1].exit_code == 1
    assert outputs[0].stdout == outputs[1].stdout
    lines = [json.loads(line) for line in outputs[1].stdout.splitlines()]
    assert [line["error"] is None for line in lines] == [True, True, True, False, True, True]  # 2b.jpg is bad


def test_writers_pad_short_paths_and_count_failures():
    preds = [
        Prediction("a.jpg", ["b"], [0.9], 0.9, [{"path": ["b", "u"], "probability": 0.5}], stopped_early=True),
        Prediction("bad.jpg", error="truncated image"),
    ]
    out = io.StringIO()
    assert write_predictions(preds, "csv", 2, 1, out) == 1
    rows = list(csv.reader(io.StringIO(out.getvalue())))
    top_k = '[{"path": ["b", "u"], "probability": 0.5}]'
    assert rows[1] == ["a.jpg", "b", "", "0.900000", "", "0.900000", "True", top_k, ""]
    assert rows[2] == ["bad.jpg", "", "", "", "", "", "False", "[]", "truncated image"]
    assert text_line(preds[0], 1) == "a.jpg  b (0.90)  [stopped early]"
    out = io.StringIO()
    write_predictions(preds, "json", 2, 1, out)
    first = json.loads(out.getvalue().splitlines()[0])
    assert set(first) == {"image", "path", "confidences", "path_probability", "top_k", "stopped_early", "error"}
    assert first["path"] == ["b"] and first["stopped_early"] is True
