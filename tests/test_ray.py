"""``lcpn train --ray`` on a local Ray cluster of 2 CPUs: the same models as a sequential run."""

import contextlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
import ray.cloudpickle
import torch
from click.testing import CliRunner
from threadpoolctl import threadpool_limits

from lcpn import artefacts, ray_engine
from lcpn.cli import main
from lcpn.config import TrainConfig
from lcpn.hierarchy import Hierarchy
from lcpn.locks import LOCK_FILE
from lcpn.ray_engine import RayError, require_visible, train_on_ray
from lcpn.train import train_nodes

ARM = "LCPN_TEST_CRASH_ARM"  # a file that, while it exists, makes the next node saved kill its worker


def features_config(cache: Path) -> TrainConfig:
    return TrainConfig(mode="features", backbone="efficientnet-lite0", image_size=32, batch_size=8, device="cpu",
                       head="linear", cache=str(cache))  # fmt: skip


def _crash_once_while_saving_a_node() -> None:
    """Set up every Ray worker: while the armed file exists, the first node to save its weights kills its worker."""
    from lcpn import fsio  # only the standard library: cheap in every worker

    real = fsio.atomic_path

    def atomic_path(path):
        if Path(path).parent.name.startswith(".staging-"):  # in the middle of a node: locked, half written
            armed = os.environ[ARM]
            with contextlib.suppress(FileNotFoundError):
                os.rename(armed, armed + ".fired")  # only one worker can claim it
                os._exit(1)  # a lost worker: no exception, no clean-up
        return real(path)

    fsio.atomic_path = atomic_path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    armed = tmp_path_factory.mktemp("crash") / "armed"
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this file
    hook = {"worker_process_setup_hook": _crash_once_while_saving_a_node, "env_vars": {ARM: str(armed)}}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env=hook)
    yield armed
    ray.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def runs(split, cluster, tmp_path_factory):
    """The split trained sequentially and through Ray (where one worker dies), each with its own embedding store."""
    tmp = tmp_path_factory.mktemp("ray")
    threads = torch.get_num_threads()
    try:  # one thread, as in a Ray worker of one CPU: the same sums in the same order, the same bits
        torch.set_num_threads(1)
        with threadpool_limits(1):
            train_nodes(split, tmp / "sequential", features_config(tmp / "cache-sequential"))
    finally:
        torch.set_num_threads(threads)
    cluster.touch()
    # node b was being trained on a machine that has left the cluster since: its retry must take it over
    lost = tmp / "ray" / "b" / LOCK_FILE
    lost.parent.mkdir(parents=True)
    lost.write_text(json.dumps({"pid": 4242, "host": "machine-that-left", "since": "2024-01-01 10:00:00",
                                "machine": "f" * 56}))  # fmt: skip
    statuses = {r.status for r in train_on_ray(split, tmp / "ray", features_config(tmp / "cache-ray"))}
    return tmp, statuses


def node_folders(split: Path, models: Path) -> list[Path]:
    tree = Hierarchy.load(split / "hierarchy.json")
    return [models / tree.folders[n] for n in tree.parents]


def figures(folder: Path) -> dict:
    info = artefacts.read_info(folder)
    return {"classes": info.classes, "kind": info.kind, "head": info.head, "metrics": info.metrics,
            "data_hash": info.data_hash, "training_key": info.config.get("training_key")}  # fmt: skip


def assert_same_models(split: Path, expected: Path, actual: Path) -> None:
    for folder in node_folders(split, expected):
        assert figures(actual / folder.relative_to(expected)) == figures(folder), folder
    assert figures(actual / "backbone") == figures(expected / "backbone")
    assert (actual / "hierarchy.json").read_text() == (expected / "hierarchy.json").read_text().replace(
        "cache-sequential", "cache-ray"
    )


def predictions(split: Path, models: Path) -> str:
    images = [r.split(",")[0] for r in (split / "test.csv").read_text().splitlines()[1:]]
    result = CliRunner().invoke(main, ["predict", *images, "--models", str(models), "--top-k", "2"])
    assert result.exit_code == 0, result.output
    return result.output


def test_ray_trains_the_same_models_and_predictions_as_a_sequential_run(runs, split):
    tmp, statuses = runs
    assert statuses == {"trained", "constant"}
    assert_same_models(split, tmp / "sequential", tmp / "ray")
    assert predictions(split, tmp / "ray") == predictions(split, tmp / "sequential")
    assert any((tmp / "cache-ray").rglob("shard-*.json"))  # the Ray Data pass filled its own store


def test_a_node_whose_worker_died_was_retried_and_finished(runs, cluster):
    tmp, _ = runs
    assert not cluster.exists() and cluster.with_name("armed.fired").exists()  # a worker did die mid-node
    leftovers = [p for p in (tmp / "ray").rglob(".*") if p.name == ".train.lock" or p.name.endswith(".tmp")]
    assert leftovers == []  # the retry took over the dead worker's lock and removed its staging folder
    assert artefacts.read_info(tmp / "ray" / "b").kind != "constant"  # and the lock of the machine that left


def test_the_command_line_on_ray_does_not_train_finished_nodes_again(runs, split):
    tmp, _ = runs
    trained = [f / "node.json" for f in node_folders(split, tmp / "ray") if artefacts.read_info(f).kind != "constant"]
    before = {p: p.stat().st_mtime_ns for p in trained}
    shards = sorted((tmp / "cache-ray").rglob("shard-*"))
    args = ["train", "--data", split, "--out", tmp / "ray", "--ray", "--mode", "features",
            "--backbone", "efficientnet-lite0", "--image-size", "32", "--device", "cpu", "--head", "linear",
            "--cache", tmp / "cache-ray"]  # fmt: skip
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert result.output.count("already trained, skipped") == len(trained) and "(0 trained now)" in result.output
    assert {p: p.stat().st_mtime_ns for p in trained} == before
    assert sorted((tmp / "cache-ray").rglob("shard-*")) == shards  # no embedding pass either


def test_the_embedding_pass_shards_over_two_actors_and_fills_the_sequential_runs_store(
    runs, split, tmp_path, monkeypatch, capsys
):
    from lcpn.embedding_store import EmbeddingStore
    from lcpn.features import open_backbone
    from lcpn.runner import load_nodes
    from lcpn.train import plan_training

    tmp, _ = runs
    monkeypatch.setattr(ray_engine, "EMBED_PER_ACTOR", 8)  # the fixture's few images make two actors' batches
    config = features_config(tmp_path / "cache")
    plan = plan_training(split.resolve(), (tmp_path / "models").resolve(), config, (), None)
    plan.write_index()
    todo = [d for d in load_nodes(plan.split_dir, plan.tree, plan.chosen, plan.attributes) if len(d.classes) > 1]
    ray_engine.embed_on_cluster(plan, plan.config, todo)
    assert "on 2 CPU worker(s)" in capsys.readouterr().out
    key = open_backbone(config)[1]
    sharded, sequential = EmbeddingStore(tmp_path / "cache", key), EmbeddingStore(tmp / "cache-sequential", key)
    assert len(list(sharded.folder.glob("shard-*.json"))) >= 2  # each actor added its own shard
    assert set(sharded) == set(sequential) and len(sharded) > 0
    for row in sequential:  # other batches than the sequential run's: equal up to float rounding
        a, b = sharded[row], sequential[row]
        assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b), (row, np.abs(a - b).max())


def test_a_cache_that_cannot_be_created_stops_the_run_in_one_sentence(cluster, split, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(RayError, match="cannot create the --cache folder .*file/cache"):
        train_on_ray(split, tmp_path / "models", features_config(tmp_path / "file" / "cache"))


def test_a_worker_that_cannot_see_the_split_stops_the_run(cluster, tmp_path):
    with pytest.raises(RayError, match="cannot see .*missing.*shared file system"):
        require_visible([tmp_path / "missing"])
