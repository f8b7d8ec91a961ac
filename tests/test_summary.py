"""`lcpn summary`: a line per node that never shows an accuracy a node does not have, and a check that each loads."""

import json

import pytest
import torch
from click.testing import CliRunner
from folders import model_folder

from lcpn.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def set_metrics(models, folder, metrics):
    path = models / folder / "node.json"
    info = json.loads(path.read_text())
    info["metrics"] = metrics
    path.write_text(json.dumps(info))


@pytest.fixture
def models(tmp_path):
    models = model_folder(tmp_path / "m", ["a/x", "a/y", "b/u", "b/v", "c/only"], "features")
    set_metrics(models, "parent", {"accuracy": 0.8333333, "macro_f1": 0.8, "n": 6, "evaluated_on": "val"})
    set_metrics(models, "a", {"accuracy": 1.0, "macro_f1": 1.0, "n": 4, "evaluated_on": "train (no val images)"})
    set_metrics(models, "b", {"accuracy": 0.5, "macro_f1": 0.5, "n": 2, "evaluated_on": "val"})
    set_metrics(models, "c", {"accuracy": 1.0, "n": 2, "evaluated_on": "val"})  # as a constant node records it
    return models


def rows(output):
    return {line.split()[0]: line.split() for line in output.splitlines()[2:] if line.strip()}


def test_summary_says_constant_and_no_val_images_instead_of_an_accuracy(models):
    result = run("summary", "--models", models)
    assert result.exit_code == 0, result.output
    table = rows(result.output)
    assert table["(root)"][:6] == ["(root)", "features", "3", "6", "0.8333", "0.8000"]
    assert table["a"][:7] == ["a", "features", "2", "4", "no", "val", "images"]
    assert table["c"][:5] == ["c", "constant", "1", "2", "constant"]
    assert "1.0000" not in result.output


def test_summary_exits_1_naming_the_nodes_that_do_not_load(models):
    torch.save(torch.nn.Linear(2, 2), models / "b" / "model.pth")
    (models / "backbone" / "model.pth").unlink()
    result = run("summary", "--models", models)
    assert result.exit_code == 1
    assert "3 node(s) cannot be loaded, so `lcpn predict` refuses this folder:" in result.output
    assert f"  (root): '{models / 'backbone' / 'model.pth'}' is missing" in result.output
    assert f"  a: '{models / 'backbone' / 'model.pth'}' is missing" in result.output
    pickled = f"  b: '{models / 'b' / 'model.pth'}' is not a plain weights file (it holds pickled objects)"
    assert pickled in result.output
    assert rows(result.output)["b"][:4] == ["b", "features", "2", "2"]  # the table is still printed


def test_summary_of_a_folder_that_is_not_a_model_folder(tmp_path):
    result = run("summary", "--models", tmp_path)
    assert result.exit_code == 2 and "is not an lcpn model folder (no hierarchy.json)." in result.output
