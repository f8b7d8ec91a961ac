"""Product attributes beside the category path: prepare, train (both modes), predict, evaluate, retrain one."""

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import FAST, import_script, write_image

from lcpn import artefacts
from lcpn.cascade import Cascade
from lcpn.cli import main
from lcpn.config import TrainConfig
from lcpn.fsio import read_csv
from lcpn.hierarchy import Hierarchy
from lcpn.prepare import prepare
from lcpn.report import REPORT_FILES
from lcpn.sources import scan_tree, with_attributes
from lcpn.train import train_nodes

LEAVES = ["a/x", "a/y", "b"]
PER_LEAF = 10
RARE = {4, 14}  # rows whose colour, "mauve", is rarer than --min-images
NO_GENDER = {3, 13, 23}  # rows with an empty gender


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def colour_of(n: int) -> str:
    return "mauve" if n in RARE else ("red" if n % 3 else "blue")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny catalogue: a folder tree and labels.csv with two attribute columns (missing and rare values)."""
    root = tmp_path_factory.mktemp("catalogue")
    rows = []
    for leaf in LEAVES:
        for i in range(PER_LEAF):
            rel = f"{leaf}/img_{i}.png"
            write_image(root / rel)
            n = len(rows)
            gender = "" if n in NO_GENDER else ("Men" if n % 2 else "Women")
            rows.append([rel, *(leaf.split("/") + [""])[:2], gender, colour_of(n)])
    with open(root / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "master", "sub", "gender", "colour"])
        writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def split(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("split")
    items, excluded = scan_tree(source)
    items = with_attributes(items, source / "labels.csv", ["gender", "colour"])
    prepare(items, excluded, out, str(source), val=0.2, test=0.2, min_images=3, attributes=["gender", "colour"])
    return out


def features_config(cache, **kw):
    return TrainConfig(mode="features", backbone="efficientnet-lite0", image_size=32, batch_size=8, workers=0,
                       device="cpu", head="linear", cache=str(cache), **kw)  # fmt: skip


@pytest.fixture(scope="module")
def featured(split, tmp_path_factory):
    """Every node and both attributes of ``split`` in features mode (Lite0 at 32 px, linear heads)."""
    tmp = tmp_path_factory.mktemp("featured")
    train_nodes(split, tmp / "models", features_config(tmp / "cache"))
    return tmp / "models"


def test_prepare_records_attributes_and_keeps_the_trees_split(split, source, tmp_path):
    index = json.loads((split / "hierarchy.json").read_text())
    assert index["attributes"]["gender"] == {"folder": "attributes/gender", "values": ["Men", "Women"], "grouped": []}
    colour = index["attributes"]["colour"]
    assert colour["grouped"] == ["mauve"] and "mauve" not in colour["values"]
    summary = json.loads((split / "summary.json").read_text())["attributes"]
    assert summary["gender"]["missing"] == len(NO_GENDER)
    assert summary["colour"]["grouped_into_other"] == {"mauve": len(RARE)}
    images = read_csv(split / "images.csv")
    assert len(images) == len(LEAVES) * PER_LEAF  # a missing value never drops an image
    assert sum(r["gender"] == "" for r in images) == len(NO_GENDER)
    assert {r["colour"] for r in read_csv(split / "test.csv")} <= {"red", "blue", "mauve"}  # raw values
    manifests = {s: read_csv(split / "attributes" / "gender" / f"{s}.csv") for s in ("train", "val")}
    in_split = {s: {r["path"] for r in images if r["split"] == s and r["gender"]} for s in ("train", "val")}
    assert {s: {r["path"] for r in rows} for s, rows in manifests.items()} == in_split
    colours = {r["label"] for s in ("train", "val") for r in read_csv(split / "attributes" / "colour" / f"{s}.csv")}
    assert colours <= set(colour["values"]) and "mauve" not in colours
    # the attributes ride along: the same split as without them
    plain = tmp_path / "plain"
    prepare(*scan_tree(source), plain, str(source), val=0.2, test=0.2, min_images=3)
    assert [(r["path"], r["split"]) for r in read_csv(plain / "images.csv")] == [
        (r["path"], r["split"]) for r in images
    ]


def test_prepare_cli_takes_attributes_from_the_csv_or_an_attributes_csv(source, tmp_path):
    with open(source / "labels.csv") as fh:
        lines = fh.read().splitlines()
    (tmp_path / "partial.csv").write_text("\n".join(lines[:-5]) + "\n")  # the last 5 images have no row
    out = tmp_path / "tree-split"
    result = run("prepare", source, "--out", out, "--attributes", "gender",
                 "--attributes-csv", tmp_path / "partial.csv", "--image-root", source)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Attribute gender: 2 values" in result.output and f"{len(NO_GENDER) + 5} image(s) without a value" in (
        result.output
    )
    from_csv = run("prepare", "--csv", source / "labels.csv", "--levels", "master", "--attributes", "colour",
                   "--out", tmp_path / "csv-split")  # fmt: skip
    assert from_csv.exit_code == 0, from_csv.output
    assert json.loads((tmp_path / "csv-split" / "hierarchy.json").read_text())["attributes"]["colour"]["grouped"] == []
    needs_csv = run("prepare", source, "--out", tmp_path / "x", "--attributes", "gender")
    assert needs_csv.exit_code == 2 and "needs --attributes-csv" in needs_csv.output
    unknown = run("prepare", "--csv", source / "labels.csv", "--levels", "master", "--attributes", "size",
                  "--out", tmp_path / "x")  # fmt: skip
    assert unknown.exit_code == 2 and "has no column 'size'" in unknown.output
    reserved = run("prepare", "--csv", source / "labels.csv", "--levels", "master", "--attributes", "split",
                   "--out", tmp_path / "x")  # fmt: skip
    assert reserved.exit_code == 2 and "taken by the manifests' own columns" in reserved.output


def test_features_mode_trains_a_head_per_attribute_reported_like_a_node(featured, split):
    index = json.loads((featured / "hierarchy.json").read_text())
    assert list(index["attributes"]) == ["gender", "colour"]
    for name in ("gender", "colour"):
        folder = featured / "attributes" / name
        for file in (*REPORT_FILES, "model.pth", "node.json"):
            assert (folder / file).is_file(), file
        info = artefacts.read_info(folder)
        assert info.mode == "features" and info.node == f"attribute:{name}"
        assert info.classes == index["attributes"][name]["values"]
        assert info.metrics["n"] == len(read_csv(split / "attributes" / name / "val.csv"))
    assert "attribute:gender" in (featured / "attributes" / "gender" / "performance.txt").read_text()


def test_the_backbone_runs_once_per_image_for_nodes_and_attributes(featured, split, monkeypatch):
    from lcpn.runtime import Runtime

    paths = [r["path"] for r in read_csv(split / "test.csv")]
    embedded, original = [], Runtime.run
    monkeypatch.setattr(Runtime, "run", lambda self, net, x: embedded.append(len(x)) or original(self, net, x))
    counts = {}
    for attributes_on in (False, True):
        embedded.clear()
        predictions = list(Cascade.load(featured, "cpu", attributes=attributes_on).predict(paths, batch_size=64))
        counts[attributes_on] = sum(embedded)
        assert all((p.attributes is not None) == attributes_on for p in predictions)
    assert counts[True] == counts[False] == 2 * len(paths)  # each picture and its mirror (test flips), once


def test_predict_writes_attributes_in_json_csv_and_text(featured, split):
    image = read_csv(split / "test.csv")[0]["path"]
    as_json = run("predict", image, "--models", featured, "--format", "json", "--top-k", "2")
    assert as_json.exit_code == 0, as_json.output
    line = json.loads(as_json.stdout)
    assert set(line["attributes"]) == {"gender", "colour"}
    gender = line["attributes"]["gender"]
    assert gender["label"] in ("Men", "Women") and gender["label"] == gender["top_k"][0]["label"]
    assert [t["label"] for t in gender["top_k"]] in (["Men", "Women"], ["Women", "Men"])
    assert gender["confidence"] == gender["top_k"][0]["probability"] >= 0.5
    as_csv = run("predict", image, "--models", featured, "--format", "csv")
    header, row = list(csv.reader(as_csv.stdout.splitlines()))
    record = dict(zip(header, row))
    assert header[-5:] == ["gender", "gender_confidence", "colour", "colour_confidence", "error"]
    assert record["gender"] == gender["label"] and float(record["gender_confidence"]) == pytest.approx(
        gender["confidence"], abs=1e-6
    )
    text = run("predict", image, "--models", featured)
    assert f"| gender: {gender['label']} (" in text.stdout and ", colour: " in text.stdout
    bare = run("predict", image, "--models", featured, "--format", "json", "--no-attributes")
    assert "attributes" not in json.loads(bare.stdout)


def test_evaluate_scores_each_attribute(featured, split, tmp_path):
    result = run("evaluate", split, "--models", featured, "--out", tmp_path / "ev")
    assert result.exit_code == 0, result.output
    assert "Attributes (per-value tables" in result.output
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())["attributes"]
    test = read_csv(split / "test.csv")
    assert metrics["gender"]["n"] + metrics["gender"]["without_value"] == len(test)
    assert metrics["colour"]["n"] + sum(metrics["colour"]["unknown_values"].values()) == len(test)
    for name in ("gender", "colour"):
        assert 0 <= metrics[name]["accuracy"] <= 1 and 0 <= metrics[name]["macro_f1"] <= 1
        table = read_csv(tmp_path / "ev" / "attributes" / f"{name}.csv")
        assert sum(int(r["support"]) for r in table) == metrics[name]["n"]
        assert (tmp_path / "ev" / "attributes" / f"confusion_{name}.png").stat().st_size > 0


def test_retraining_one_attribute_leaves_the_rest(featured, split, tmp_path):
    import shutil

    models = tmp_path / "models"
    shutil.copytree(featured, models)
    before = {p: (models / p / "node.json").stat().st_mtime_ns for p in ("parent", "a", "attributes/colour")}
    result = run("train", "--data", split, "--out", models, "--mode", "features", "--backbone", "efficientnet-lite0",
                 "--head", "linear", "--cache", featured.parent / "cache", "--attribute", "gender", "--force",
                 *FAST[:2], *FAST[-2:])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "node attribute:gender: ready" in result.output
    assert {p: (models / p / "node.json").stat().st_mtime_ns for p in before} == before
    assert list(json.loads((models / "hierarchy.json").read_text())["attributes"]) == ["gender", "colour"]
    unknown = run("train", "--data", split, "--out", models, "--mode", "features", "--attribute", "size")
    assert (
        unknown.exit_code == 2 and "unknown attribute 'size'" in unknown.output and "gender, colour" in (unknown.output)
    )


def test_one_attribute_reads_colour_and_the_heads_beside_it_do_not_move(featured, split, tmp_path):
    import shutil

    from lcpn.colour import LEVELS

    models = tmp_path / "models"
    shutil.copytree(featured, models)
    paths = [r["path"] for r in read_csv(split / "test.csv")]

    def predictions(**kw):
        cascade = Cascade.load(models, "cpu", **kw)
        return cascade.nodes[""].backbone, list(cascade.predict(paths, batch_size=64))

    def retrain(name, **kw):
        train_nodes(split, models, features_config(featured.parent / "cache", **kw), None, True, [name])

    _, before = predictions()
    retrain("colour", colour_features=True)
    head = {n: artefacts.read_info(models / "attributes" / n).head["in_features"] for n in ("gender", "colour")}
    assert head["colour"] == head["gender"] + LEVELS**3 + 4
    assert artefacts.reads_colour(artefacts.read_info(models / "backbone"))
    backbone, after = predictions()
    assert backbone.embedder.colour is not None
    for old, new in zip(before, after, strict=True):  # the nodes and gender read the same columns as before
        assert (new.path, new.attributes["gender"]["label"]) == (old.path, old.attributes["gender"]["label"])
        assert new.confidences == pytest.approx(old.confidences, abs=1e-5)
        assert new.attributes["gender"]["confidence"] == pytest.approx(old.attributes["gender"]["confidence"], abs=1e-5)
    category_only, paths_only = predictions(attributes=False)
    assert category_only.embedder.colour is None  # no loaded head reads it: not computed
    assert [p.path for p in paths_only] == [p.path for p in before]

    retrain("gender")
    assert artefacts.reads_colour(artefacts.read_info(models / "backbone"))  # the colour head still reads it
    retrain("colour")
    assert not artefacts.reads_colour(artefacts.read_info(models / "backbone"))  # no head reads it any more
    assert predictions()[0].embedder.colour is None


def test_finetune_mode_trains_a_network_for_one_attribute(split, tmp_path):
    config = TrainConfig(backbone="efficientnet-lite0", image_size=32, epochs=1, batch_size=8, workers=0, device="cpu")
    results = train_nodes(split, tmp_path / "models", config, nodes=None, attributes=["gender"])
    assert [(r.node, r.status) for r in results] == [("attribute:gender", "trained")]
    loaded = artefacts.load_node(tmp_path / "models" / "attributes" / "gender")
    assert loaded.info.mode == "finetune" and loaded.info.classes == ["Men", "Women"]
    assert loaded.network is not None and loaded.transforms is not None
    assert not (tmp_path / "models" / "parent").exists()  # the tree's nodes were not asked for


def test_the_onnx_export_predicts_the_attributes_as_torch_does(featured, split, tmp_path):
    from lcpn.export import export

    manifest = export(featured, tmp_path / "onnx")
    assert set(manifest["attributes"]) == {"gender", "colour"}
    assert manifest["attributes"]["gender"]["output"] in manifest["models"]["lcpn.onnx"]["outputs"]
    images = [r["path"] for r in read_csv(split / "test.csv")][:6]
    by_torch = run("predict", *images, "--models", featured, "--format", "json", "--top-k", "2")
    by_onnx = run("predict", *images, "--models", tmp_path / "onnx", "--runtime", "onnx", "--format", "json",
                  "--top-k", "2")  # fmt: skip
    assert by_onnx.exit_code == 0, by_onnx.output
    for torch_line, onnx_line in zip(by_torch.stdout.splitlines(), by_onnx.stdout.splitlines(), strict=True):
        want, got = json.loads(torch_line)["attributes"], json.loads(onnx_line)["attributes"]
        assert set(got) == {"gender", "colour"}
        for name in want:
            assert got[name]["label"] == want[name]["label"]
            assert got[name]["confidence"] == pytest.approx(want[name]["confidence"], abs=1e-4)


def test_serve_answers_the_attributes_and_its_page_shows_them(featured, split):
    import httpx
    from browser import classify_in_page, launch, live_server
    from playwright.sync_api import expect, sync_playwright

    from lcpn.serve import create_app

    images = [Path(r["path"]) for r in read_csv(split / "test.csv")[:2]]
    with live_server(create_app(featured, device="cpu")) as url, sync_playwright() as playwright:
        model = httpx.get(f"{url}/v1/model", timeout=60).json()
        assert [a["name"] for a in model["attributes"]] == ["gender", "colour"]
        files = [("files", (p.name, p.read_bytes())) for p in images]
        answered = httpx.post(f"{url}/v1/predict", files=files, timeout=120).json()["predictions"]
        assert [a["attributes"] for a in answered] == [p.attributes for p in Cascade.load(featured, "cpu").predict(
            [str(p) for p in images])]  # fmt: skip
        browser = launch(playwright)
        page = browser.new_page()
        classify_in_page(page, url, images)
        expect(page.locator("#model-summary")).to_contain_text("attributes: gender, colour")
        for answer in answered:
            card = page.locator(f'.card[data-file="{Path(answer["image"]).name}"]')
            gender = answer["attributes"]["gender"]
            expect(card.locator('[data-attribute="gender"]')).to_have_text(
                f"gender: {gender['label']} ({100 * gender['confidence']:.1f}%)"
            )
            expect(card.locator('[data-attribute="colour"]')).to_contain_text(answer["attributes"]["colour"]["label"])
        browser.close()


def test_the_benchmarks_finetune_slice_of_a_split_with_attributes_trains_the_nodes_alone(split, tmp_path):
    benchmark = import_script("benchmark")
    config = TrainConfig(backbone="efficientnet-lite0", image_size=32, epochs=1, batch_size=8, workers=0, device="cpu")
    tree = Hierarchy.load(split / "hierarchy.json")
    run_ = benchmark.finetune_models(split, tmp_path, tree, "efficientnet-lite0", 4, config)
    assert run_.seconds_per_image > 0
    assert {p.name for p in run_.models.iterdir()} >= {"a", "parent"}
    assert not (run_.models / "attributes").exists()  # the slice copies the tree's manifests only
