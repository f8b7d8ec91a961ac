"""Label-shift correction: EM finds a batch's class mix, the tree counts images where they belong,
and `--adapt-priors` decodes from the corrected probabilities."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write_image

from lcpn import artefacts
from lcpn.cascade import Cascade
from lcpn.cli import main
from lcpn.config import TrainConfig
from lcpn.fsio import read_csv
from lcpn.hierarchy import Hierarchy
from lcpn.label_shift import adapt, adapt_tree
from lcpn.train import train_nodes


def posteriors(x: np.ndarray, prior: tuple[float, float]) -> np.ndarray:
    """Exact posteriors of two unit Gaussians at -1 and +1 under ``prior``: a calibrated classifier."""
    likelihood = np.exp(-0.5 * (x[:, None] - np.array([-1.0, 1.0])) ** 2)
    joint = likelihood * np.array(prior)
    return joint / joint.sum(1, keepdims=True)


def shifted_batch(mix: float, n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) > mix).astype(int)  # class 0 with probability ``mix``
    return rng.normal(np.where(y == 0, -1.0, 1.0)), y


def test_em_finds_a_new_mix_and_corrects_the_decisions():
    x, y = shifted_batch(0.9)
    trained_on = posteriors(x, (0.5, 0.5))
    adapted, mix = adapt(trained_on, [0.5, 0.5])
    assert mix[0] == pytest.approx(0.9, abs=0.03)
    np.testing.assert_allclose(adapted, posteriors(x, tuple(mix)), atol=1e-9)  # Bayes' rule under the new mix
    before, after = (trained_on.argmax(1) == y).mean(), (adapted.argmax(1) == y).mean()
    assert after > before + 0.05


def test_em_leaves_a_batch_mixed_like_training_alone():
    x, _ = shifted_batch(0.5, seed=1)
    trained_on = posteriors(x, (0.5, 0.5))
    adapted, mix = adapt(trained_on, [0.5, 0.5])
    assert mix[0] == pytest.approx(0.5, abs=0.03)
    assert np.abs(adapted - trained_on).max() < 0.05


def test_a_node_mix_counts_only_the_images_that_reach_it():
    tree = Hierarchy.from_leaves(["a/x", "a/y", "b/u", "b/v"])
    # 200 images certainly of a, all x; 200 certainly of b, all u: each child node sees only its own
    n = 200
    root = np.vstack([np.tile([0.999, 0.001], (n, 1)), np.tile([0.001, 0.999], (n, 1))])
    under_a = np.vstack([np.tile([0.8, 0.2], (n, 1)), np.tile([0.2, 0.8], (n, 1))])  # b's images look like y
    under_b = np.vstack([np.tile([0.5, 0.5], (n, 1)), np.tile([0.8, 0.2], (n, 1))])
    priors = {"": [0.5, 0.5], "a": [0.5, 0.5], "b": [0.5, 0.5]}
    adapted, mixes = adapt_tree(tree, {"": root, "a": under_a, "b": under_b}, priors)
    assert mixes["a"][0] > 0.9  # had b's images counted, a's mix would look half x, half y
    assert mixes["b"][0] > 0.9
    assert adapted["a"].shape == under_a.shape and np.allclose(adapted["a"].sum(1), 1)


def test_the_temperature_fitted_is_the_one_that_made_the_labels():
    from lcpn.features import fit_temperature, tempered

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (6000, 3))
    truth = tempered(np.exp(logits), 2.0)  # the labels follow logits / 2: the raw softmax is overconfident
    y = np.array([rng.choice(3, p=p) for p in truth])
    assert fit_temperature(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), y) == pytest.approx(2.0, abs=0.2)


def test_a_linear_head_with_a_temperature_divides_its_logits_by_it(linear_models, split, tmp_path):
    import torch

    config = TrainConfig(mode="features", backbone="efficientnet-lite0", image_size=32, batch_size=8, workers=0,
                         device="cpu", cache=str(linear_models.parent / "cache"), head="linear",
                         temperature=True)  # fmt: skip
    train_nodes(split, tmp_path / "models", config)
    plain, tempered_head = (artefacts.load_node(m / "parent") for m in (linear_models, tmp_path / "models"))
    t = tempered_head.info.head["temperature"]
    assert 0.5 <= t <= 3.0 and "temperature" not in plain.info.head
    x = torch.randn(7, plain.info.head["in_features"])
    with torch.no_grad():
        expected = (plain.network(x) / t).softmax(1)
        torch.testing.assert_close(tempered_head.network(x).softmax(1), expected, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def linear_models(split, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapt")
    config = TrainConfig(mode="features", backbone="efficientnet-lite0", image_size=32, batch_size=8, workers=0,
                         device="cpu", cache=str(tmp / "cache"), head="linear")  # fmt: skip
    train_nodes(split, tmp / "models", config)
    return tmp / "models"


def test_each_node_records_the_class_mix_it_expects(linear_models):
    for folder in ("parent", "a", "b", "a/x"):
        info = artefacts.read_info(linear_models / folder)
        assert len(info.metrics["prior"]) == len(info.classes)
        assert sum(info.metrics["prior"]) == pytest.approx(1.0, abs=1e-4)


def test_adapted_prediction_keeps_order_and_errors_and_follows_the_batch(linear_models, split, tmp_path):
    rows = read_csv(split / "images.csv")
    cascade = Cascade.load(linear_models, "cpu")
    first = cascade.tree.children[""][0]
    ones = [r["path"] for r in rows if r["leaf"].startswith(first + "/")]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    sources = [*ones, str(broken)]
    adapted = list(cascade.predict(sources, batch_size=4, adapt_priors=True))
    assert [p.image for p in adapted] == sources and adapted[-1].error and all(p.path for p in adapted[:-1])
    mix = cascade.estimated_mix
    assert set(mix) == {n for n in cascade.tree.parents if len(cascade.tree.children[n]) > 1}
    assert all(sum(m) == pytest.approx(1.0, abs=1e-6) for m in mix.values())
    # a batch of one top-level class only: the root's estimated mix leans to it beyond what it expected
    assert mix[""][0] > cascade.priors[""][0]
    plain = list(cascade.predict(sources, batch_size=4))
    assert [p.path for p in adapted].count([]) == [p.path for p in plain].count([]) == 1


def test_the_priors_travel_with_the_export_and_onnx_adapts_as_torch_does(linear_models, split, tmp_path):
    from lcpn.export import export
    from lcpn.onnx_runtime import load_onnx_models

    manifest = export(linear_models, tmp_path / "onnx")
    torch_cascade, onnx_cascade = Cascade.load(linear_models, "cpu"), Cascade.of(load_onnx_models(tmp_path / "onnx"))
    assert onnx_cascade.priors == torch_cascade.priors and manifest["nodes"][""]["prior"] == torch_cascade.priors[""]
    paths = [r["path"] for r in read_csv(split / "test.csv")]
    by_torch = list(torch_cascade.predict(paths, adapt_priors=True))
    by_onnx = list(onnx_cascade.predict(paths, adapt_priors=True))
    assert [p.path for p in by_onnx] == [p.path for p in by_torch]
    for node, mix in torch_cascade.estimated_mix.items():
        assert onnx_cascade.estimated_mix[node] == pytest.approx(mix, abs=1e-4)


def test_models_whose_probabilities_are_not_calibrated_are_refused(split, tmp_path):
    config = TrainConfig(mode="features", backbone="efficientnet-lite0", image_size=32, batch_size=8, workers=0,
                         device="cpu", cache=str(tmp_path / "cache"), head="mlp", head_epochs=2,
                         mlp_members=1)  # fmt: skip
    train_nodes(split, tmp_path / "models", config)
    image = write_image(tmp_path / "i.png", (200, 30, 30), size=32)
    result = CliRunner().invoke(main, ["predict", str(image), "--models", str(tmp_path / "models"), "--adapt-priors"])
    assert result.exit_code == 2
    assert "--adapt-priors needs logistic-regression heads" in result.output and "node(s) root, " in result.output


def test_predict_and_evaluate_take_adapt_priors(linear_models, split, tmp_path):
    image = write_image(tmp_path / "i.png", (200, 30, 30), size=32)
    predicted = CliRunner().invoke(main, ["predict", str(image), "--models", str(linear_models), "--adapt-priors",
                                          "--format", "json"])  # fmt: skip
    assert predicted.exit_code == 0, predicted.output
    assert json.loads(predicted.stdout)["path"]
    out = tmp_path / "eval"
    evaluated = CliRunner().invoke(main, ["evaluate", str(split), "--models", str(linear_models), "--out", str(out),
                                          "--adapt-priors"])  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["adapt_priors"] is True
    assert sum(metrics["estimated_class_mix"]["root"].values()) == pytest.approx(1.0, abs=1e-4)
