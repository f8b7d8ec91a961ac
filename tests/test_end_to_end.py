"""predict and evaluate on real (tiny, briefly trained) EfficientNet-Lite0 node models."""

import json
import shutil

import pytest
from click.testing import CliRunner
from conftest import write_image

from lcpn.cascade import Cascade
from lcpn.cli import main
from lcpn.evaluate import evaluate, split_test_items
from lcpn.fsio import read_csv
from lcpn.hierarchy import Hierarchy
from lcpn.metrics import hierarchical_prf, leaf_scores, level_scores, path_accuracy
from lcpn.sources import LabelledImage


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def images_with_a_corrupt_one(split, tmp_path):
    folder = tmp_path / "incoming"
    folder.mkdir()
    for i, row in enumerate(read_csv(split / "test.csv")[:4]):
        shutil.copy(row["path"], folder / f"{i}.jpg")
    data = (folder / "0.jpg").read_bytes()
    (folder / "1b_corrupt.jpg").write_bytes(data[: len(data) // 3])
    return folder


def test_predict_json_on_a_folder_with_a_corrupt_jpeg(finetuned, images_with_a_corrupt_one):
    result = run("predict", images_with_a_corrupt_one, "--models", finetuned, "--format", "json", "--top-k", "3")
    assert result.exit_code == 1
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 5
    bad = [line for line in lines if line["image"].endswith("1b_corrupt.jpg")][0]
    assert bad["error"] == "truncated image" and bad["path"] == []
    for line in lines:
        if line is bad:
            continue
        assert line["error"] is None and 2 <= len(line["path"]) <= 3
        assert line["path"][0] in {"a", "b", "c"}
        assert len(line["top_k"]) == 3 and line["top_k"][0]["probability"] >= line["top_k"][1]["probability"]


def test_predict_text_and_csv(finetuned, images_with_a_corrupt_one):
    text = run("predict", images_with_a_corrupt_one / "0.jpg", "--models", finetuned)
    assert text.exit_code == 0
    assert text.output.startswith(str(images_with_a_corrupt_one / "0.jpg")) and " > " in text.output
    table = run("predict", images_with_a_corrupt_one, "--models", finetuned, "--format", "csv")
    header = table.stdout.splitlines()[0].split(",")
    assert header[:4] == ["image", "level_1", "level_2", "level_3"] and header[-1] == "error"
    assert len(table.stdout.splitlines()) == 6


def test_real_models_give_the_same_paths_in_any_batch_size(finetuned, split):
    cascade = Cascade.load(finetuned, "cpu")
    paths = [r["path"] for r in read_csv(split / "test.csv")]
    one = [p.to_dict() for p in cascade.predict(paths, batch_size=1, top_k=2)]
    many = [p.to_dict() for p in cascade.predict(paths, batch_size=7, top_k=2)]
    assert [p["path"] for p in one] == [p["path"] for p in many]
    for a, b in zip(one, many):
        assert a["path_probability"] == pytest.approx(b["path_probability"], abs=1e-4)


def test_evaluate_measures_the_predictions_that_predict_makes(finetuned, split, tmp_path):
    result = run("evaluate", split, "--models", finetuned, "--out", tmp_path / "ev", "--format", "json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics == json.loads((tmp_path / "ev" / "metrics.json").read_text())
    truth = {r["path"]: r["label_path"] for r in read_csv(split / "test.csv")}
    predicted = run("predict", *truth, "--models", finetuned, "--format", "json")
    paths = {line["image"]: "/".join(line["path"]) for line in map(json.loads, predicted.stdout.splitlines())}
    y_true, y_pred = list(truth.values()), [paths[p] for p in truth]
    assert metrics["n_images"] == len(truth)
    assert metrics["path_accuracy"] == pytest.approx(path_accuracy(y_true, y_pred))
    assert metrics["levels"] == level_scores(y_true, y_pred)  # the same numbers, through JSON
    assert metrics["hierarchical"] == pytest.approx(hierarchical_prf(y_true, y_pred))
    leaves = Hierarchy.load(finetuned / "hierarchy.json").leaves
    assert metrics["leaves"] == leaf_scores(y_true, y_pred, leaves)
    root = metrics["error_propagation"]["nodes"]["(root)"]
    assert root["n"] == len(truth)
    assert root["cascade_accuracy"] == pytest.approx(sum(t[0] == p[:1] for t, p in zip(y_true, y_pred)) / len(truth))
    assert set(metrics["error_propagation"]["nodes"]) >= {"(root)", "a", "b", "a/x"}
    assert (tmp_path / "ev" / "confusion_level_1.png").is_file()
    assert (tmp_path / "ev" / "nodes" / "confusion_a__x.png").is_file()
    assert read_csv(tmp_path / "ev" / "leaves.csv")[0].keys() == {"leaf", "precision", "recall", "f1", "support"}
    text = run("evaluate", split, "--models", finetuned, "--out", tmp_path / "ev2")
    assert "path accuracy:" in text.output and "Per node" in text.output


def test_unknown_classes_are_reported_and_left_out(finetuned, split, tmp_path):
    cascade = Cascade.load(finetuned, "cpu")
    items = split_test_items(split)
    stranger = write_image(tmp_path / "z" / "new.jpg")
    items += [LabelledImage(str(stranger), "z"), LabelledImage(str(stranger), "a/x/new")]
    result = evaluate(cascade, items)
    assert result.metrics["unknown_classes"] == {"a/x/new": 1, "z": 1}
    assert result.metrics["left_out"] == {"class unknown to the model": 2}
    assert result.metrics["n_images"] == len(items) - 2


def test_evaluate_user_errors(finetuned, tmp_path):
    nothing = run("evaluate", "--models", finetuned)
    assert nothing.exit_code == 2 and "give DATA" in nothing.output
    write_image(tmp_path / "data" / "q" / "1.jpg")
    write_image(tmp_path / "data" / "r" / "1.jpg")
    unknown = run("evaluate", tmp_path / "data", "--models", finetuned, "--out", tmp_path / "ev")
    assert unknown.exit_code == 2
    assert "none of the images could be evaluated (left out: class unknown to the model: 2)." in unknown.output
