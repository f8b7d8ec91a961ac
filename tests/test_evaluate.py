"""`lcpn evaluate`: nothing left out without a word, training images flagged, per-leaf scores, quiet on small sets."""

import json
import shutil

import pytest
from click.testing import CliRunner
from conftest import hash_bits, make_tree, product_photo, write_image
from folders import model_folder
from PIL import Image as PILImage

from lcpn.cascade import Cascade
from lcpn.cli import main
from lcpn.duplicates import NEAR_DUPLICATE_BITS, perceptual_hash, thumbnail
from lcpn.evaluate import evaluate, split_test_items, worst_leaves
from lcpn.fsio import read_csv, write_csv
from lcpn.metrics import leaf_scores
from lcpn.overlap import Fingerprint, NoTrainingRecord, TrainingImages
from lcpn.sources import LabelledImage, scan_tree

LEAVES = ["a/x/p", "a/x/q", "a/y", "b/u", "b/v", "c/only"]  # the tree of the `split` fixture


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def models(split, tmp_path_factory):
    """Untrained models of the split's tree that record the split, as `lcpn train` does."""
    return model_folder(tmp_path_factory.mktemp("models"), LEAVES, split=split)


def test_every_left_out_file_is_reported_and_counted(models, tmp_path):
    data = make_tree(tmp_path / "data", {"a/x/p": 2, "b/u": 2, "z/new": 1})
    write_image(data / "a" / "beside.png")  # beside sub-folders: no leaf class
    (data / "b" / "u" / "cut.png").write_bytes(write_image(tmp_path / "whole.png").read_bytes()[:30])
    excluded = scan_tree(data)[1]
    assert excluded  # the scan's own reasons, whatever they are, must reach the report
    result = run("evaluate", data, "--models", models, "--out", tmp_path / "ev")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["n_images"] == 4
    assert metrics["left_out"] == {
        "excluded by the source": len(excluded), "class unknown to the model": 1, "unreadable image": 1,
    }  # fmt: skip
    files = {f["path"]: (f["reason"], f["detail"]) for f in metrics["left_out_files"]}
    assert {e.path: ("excluded by the source", e.reason) for e in excluded}.items() <= files.items()
    assert files[str(data / "z" / "new" / "img_0.png")] == ("class unknown to the model", "z/new")
    assert files[str(data / "b" / "u" / "cut.png")][0] == "unreadable image"
    assert f"Left out: {len(excluded) + 2} file(s)" in result.output
    assert f"  {data / 'a' / 'beside.png'}: excluded by the source (" in result.output
    assert "  class unknown to the model: 1" in result.output


def test_csv_rows_left_out_by_the_scan_are_reported(models, tmp_path):
    write_image(tmp_path / "1.png")
    write_image(tmp_path / "2.png")
    write_csv(tmp_path / "labels.csv", ["path", "top", "sub"], [["1.png", "b", "u"], ["2.png", "b", ""]])
    result = run("evaluate", "--csv", tmp_path / "labels.csv", "--levels", "top,sub", "--models", models,
                 "--out", tmp_path / "ev", "--format", "json")  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["n_images"] == 1 and metrics["left_out"] == {"excluded by the source": 1}
    assert metrics["left_out_files"][0]["detail"] == "labels.csv line 3: empty label in sub"


def test_the_split_test_set_is_not_flagged_but_training_images_are(models, split, tmp_path):
    own_test = run("evaluate", split, "--models", models, "--out", tmp_path / "test", "--format", "json")
    assert own_test.exit_code == 0, own_test.output
    has_phash = "phash" in read_csv(split / "images.csv")[0]
    assert json.loads(own_test.stdout)["training_overlap"] == {
        "exact": 0, "near": 0, "split": str(split.resolve()), "near_checked": has_phash,
    }  # fmt: skip
    assert "Warning" not in own_test.output
    rows = read_csv(split / "images.csv")
    seen = [r for r in rows if r["split"] in ("train", "val")]
    copies = tmp_path / "copies"
    for i, r in enumerate(seen[:3]):  # copies of training files under other names are still training files
        shutil.copy(r["path"], write_image(copies / r["leaf"] / f"copy{i}.jpg"))
    result = run("evaluate", copies, "--models", models, "--out", tmp_path / "copies-ev")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "copies-ev" / "metrics.json").read_text())
    assert metrics["training_overlap"]["exact"] == 3
    assert "Warning: 3 of the images were seen in training (3 identical files, " in result.output


def test_near_duplicates_count_by_perceptual_hash(tmp_path):
    write_csv(tmp_path / "images.csv", ["path", "sha256", "leaf", "split", "phash"], [
        ["t.jpg", "aa", "a", "train", "00000000000000ff"],
        ["v.jpg", "bb", "a", "val", "ffff000000000000"],
        ["s.jpg", "cc", "a", "test", "0f0f0f0f0f0f0f0f"],
    ])  # fmt: skip
    (tmp_path / "hierarchy.json").write_text(json.dumps({"split": str(tmp_path)}))
    training = TrainingImages.of_models(tmp_path)
    near = f"{0xFF >> NEAR_DUPLICATE_BITS:016x}"  # NEAR_DUPLICATE_BITS bits away from the train image
    far = f"{0xFF >> (NEAR_DUPLICATE_BITS + 1):016x}"
    fingerprints = [Fingerprint("aa", "1234567890abcdef"), Fingerprint("x1", near), Fingerprint("x2", far),
                    Fingerprint("x3", "0f0f0f0f0f0f0f0f")]  # fmt: skip
    assert training.count(fingerprints) == {"exact": 1, "near": 1, "split": str(tmp_path), "near_checked": True}


def test_a_near_hash_counts_only_where_the_thumbnails_agree(tmp_path):
    seen = tmp_path / "train.png"
    product_photo((200, 30, 30)).save(seen)
    product_photo((200, 30, 30)).resize((96, 128)).save(tmp_path / "copy.jpg", quality=75)
    product_photo((30, 60, 200)).save(tmp_path / "variant.png")  # near hash, other colours: another product
    write_csv(tmp_path / "images.csv", ["path", "sha256", "leaf", "split", "phash"],
              [[str(seen), "aa", "a", "train", perceptual_hash(PILImage.open(seen))]])  # fmt: skip
    (tmp_path / "hierarchy.json").write_text(json.dumps({"split": str(tmp_path)}))
    training = TrainingImages.of_models(tmp_path)
    pictures = {name: PILImage.open(tmp_path / name).convert("RGB") for name in ("copy.jpg", "variant.png")}
    fingerprints = [
        training.fingerprint(str(tmp_path / n), perceptual_hash(p), thumbnail(p)) for n, p in pictures.items()
    ]
    assert all(hash_bits(f.phash, training.phash[0]) <= NEAR_DUPLICATE_BITS for f in fingerprints)
    assert training.count(fingerprints)["near"] == 1
    seen.unlink()  # the training file gone: its hash alone decides
    assert TrainingImages.of_models(tmp_path).count(fingerprints)["near"] == 2


def test_models_without_their_split_are_not_checked(tmp_path):
    (tmp_path / "hierarchy.json").write_text(json.dumps({"split": str(tmp_path / "gone")}))
    with pytest.raises(NoTrainingRecord, match="the split the models were trained from, '.*gone', is not there"):
        TrainingImages.of_models(tmp_path)


def test_per_leaf_scores_are_written_and_the_worst_printed(models, split, tmp_path):
    result = run("evaluate", split, "--models", models, "--out", tmp_path / "ev")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    rows = read_csv(tmp_path / "ev" / "leaves.csv")
    assert [r["leaf"] for r in rows] == [leaf["leaf"] for leaf in metrics["leaves"]]
    assert sum(int(r["support"]) for r in rows) == metrics["n_images"]
    shown = min(10, len(rows))
    assert f"Leaves with the lowest F1 ({shown} of {len(rows)}; all of them in leaves.csv)" in result.output


def test_missed_classes_come_before_classes_only_named_wrongly_at_equal_f1():
    # Saree: 3 photos, none found; Cufflinks: no photo, named for 2 Jewellery photos; Jewellery: 1 of 3 found.
    truth = ["Saree"] * 3 + ["Jewellery"] * 3 + ["Topwear"] * 4
    predicted = ["Topwear"] * 3 + ["Cufflinks"] * 2 + ["Jewellery"] + ["Topwear"] * 4
    order = [leaf["leaf"] for leaf in worst_leaves(leaf_scores(truth, predicted, ["Cufflinks", "Jewellery", "Saree",
                                                                                  "Topwear"]))]  # fmt: skip
    assert order == ["Saree", "Cufflinks", "Jewellery", "Topwear"]


@pytest.mark.filterwarnings("error::sklearn.exceptions.UndefinedMetricWarning")
@pytest.mark.filterwarnings("error::UserWarning:sklearn")
def test_a_tiny_set_gives_no_metric_warnings(models, split, tmp_path):
    cascade = Cascade.load(models, "cpu")
    items = split_test_items(split)[:1] + [LabelledImage(split_test_items(split)[-1].path, "a/y")]
    result = evaluate(cascade, items, tmp_path / "ev")
    assert result.metrics["n_images"] == 2
    assert result.metrics["leaves"] == leaf_scores([it.leaf for it in items], [p.node for _, p in result.predictions],
                                                   LEAVES)  # fmt: skip


def test_a_batch_hook_decodes_the_evaluated_probabilities_greedily_as_a_greedy_evaluation_would(models, split):
    cascade = Cascade.load(models, "cpu")
    items = split_test_items(split)
    greedy = {}

    def hook(batch, probs, indices):
        greedy.update(zip(indices, cascade.greedy_leaves(batch, probs, range(len(indices)))))

    best = evaluate(cascade, items, batch_size=4, on_batch=hook)
    alone = evaluate(cascade, items, batch_size=4, decode="greedy")
    assert sorted(greedy) == list(range(len(best.predictions))) and len(greedy) > 4  # every row of every batch
    assert [greedy[i] for i in range(len(greedy))] == [p.node for _, p in alone.predictions]
