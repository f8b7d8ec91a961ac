"""scripts/finetune_subset.py: one node of a split as a small split that `lcpn evaluate` can check and read."""

from __future__ import annotations

import pytest
from conftest import import_script

from lcpn import fsio
from lcpn.hierarchy import Hierarchy
from lcpn.overlap import TrainingImages
from lcpn.sources import SourceError, scan_csv


@pytest.fixture(scope="module")
def finetune_subset():
    return import_script("finetune_subset")


def test_the_subset_records_its_sampled_images_for_the_overlap_check(finetune_subset, split, tmp_path):
    counts = finetune_subset.write_subset(split, "a", tmp_path, 3, 2, 0)
    sub = Hierarchy.load(tmp_path / "split" / "hierarchy.json")
    manifests = {n: fsio.read_csv(tmp_path / "split" / sub.folders[""] / f"{n}.csv") for n in ("train", "val")}
    assert [len(manifests["train"]), len(manifests["val"])] == [counts["train"], counts["val"]]
    assert max(sum(r["label"] == c for r in manifests["train"]) for c in ("x", "y")) == 3  # the per-class cap

    models = tmp_path / "models"  # what `lcpn train --data OUT/split` records
    fsio.write_json(models / "hierarchy.json", {"split": str(tmp_path / "split")})
    seen = TrainingImages.of_models(models)
    assert seen.sha256 == {r["sha256"] for rows in manifests.values() for r in rows}
    parent_phash = {r["path"]: r["phash"] for r in fsio.read_csv(split / "images.csv")}
    assert seen.phash == [parent_phash[r["path"]] for rows in manifests.values() for r in rows]


def test_the_subsets_test_csv_reads_with_the_documented_image_root(finetune_subset, split, tmp_path):
    counts = finetune_subset.write_subset(split, "a", tmp_path, 3, 2, 0)
    below = [r for r in fsio.read_csv(split / "test.csv") if r["label_path"].startswith("a/")]
    items, excluded = scan_csv(tmp_path / "test.csv", ["label"], "path", "/")
    assert len(items) == counts["test"] == len(below) > 0 and not excluded
    assert sorted(it.leaf for it in items) == sorted(r["label_path"].split("/")[1] for r in below)
    with pytest.raises(SourceError, match="no usable rows"):  # the split's absolute paths lie outside OUT
        scan_csv(tmp_path / "test.csv", ["label"], "path")
