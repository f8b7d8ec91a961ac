"""``train_lcpn.sh``: one `lcpn train` call per node and per attribute, JOBS at a time."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner
from conftest import make_tree

from lcpn import artefacts
from lcpn.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_the_script_trains_every_node_and_attribute_two_at_a_time(tmp_path):
    data = make_tree(tmp_path / "data", {"a/x": 8, "a/y": 8, "b/u": 8, "b/v": 8}, suffix=".jpg")
    images = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.jpg"))
    with open(data / "labels.csv", "w", newline="") as fh:
        rows = [[p, "Men" if i % 2 else "Women"] for i, p in enumerate(images)]
        csv.writer(fh).writerows([["path", "gender"], *rows])
    split, models = tmp_path / "split", tmp_path / "models"
    prepared = CliRunner().invoke(main, ["prepare", str(data), "--out", str(split), "--attributes", "gender",
                                         "--attributes-csv", str(data / "labels.csv")])  # fmt: skip
    assert prepared.exit_code == 0, prepared.output
    env = {**os.environ, "SPLIT": str(split), "MODELS": str(models), "JOBS": "2",
           "LCPN_VENV": str(Path(sys.executable).parent.parent)}  # fmt: skip
    options = ["--mode", "features", "--backbone", "efficientnet-lite0", "--image-size", "32", "--head", "linear",
               "--device", "cpu", "--workers", "0", "--cache", str(tmp_path / "cache")]  # fmt: skip
    run = subprocess.run(["bash", str(REPO / "train_lcpn.sh"), str(data), "--", *options], env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "The split in" in run.stdout and "is up to date" in run.stdout  # the attributes' split is kept
    assert "4 of 4 parent nodes and attributes ready" in run.stdout
    for folder in ("parent", "a", "b", "attributes/gender"):
        assert artefacts.read_info(models / folder).metrics["n"] > 0, folder
    assert list(json.loads((models / "hierarchy.json").read_text())["attributes"]) == ["gender"]
    assert "| gender: " in run.stdout  # the sample predictions name the attribute
