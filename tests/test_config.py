import pytest
import torch

from lcpn.artefacts import NodeInfo
from lcpn.config import ConfigError, TrainConfig, make_config, read_config_file


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("epochs = 0", ["key epochs", "not in the range x>=1"]),
        ("epochs = 2.5", ["key epochs", "expected integer"]),
        ('lr = "fast"', ["key lr", "not a valid float"]),
        ("label-smoothing = 1.0", ["key label_smoothing", "0<=x<1"]),
        ('device = "tpu"', ["key device", "'tpu' is not one of"]),
        ('augment = "yes"', ["key augment", "expected boolean"]),
    ],
)
def test_config_file_values_are_checked_like_flags(tmp_path, line, words):
    path = tmp_path / "lcpn.toml"
    path.write_text(f"[train]\n{line}\n")
    with pytest.raises(ConfigError) as caught:
        read_config_file(path)
    assert str(path) in str(caught.value)
    for word in words:
        assert word in str(caught.value)


def test_config_file_values_of_the_right_type_are_kept(tmp_path):
    path = tmp_path / "lcpn.json"
    path.write_text('{"epochs": 3, "lr": 1, "augment": false, "image-size": 64}')
    assert read_config_file(path) == {"epochs": 3, "lr": 1.0, "augment": False, "image_size": 64}
    with pytest.raises(ConfigError, match="cannot read the config file"):
        read_config_file(tmp_path / "missing.toml")


def test_each_mode_has_its_own_defaults_and_an_explicit_value_wins():
    assert (TrainConfig().resolved().lr, TrainConfig().resolved().weight_decay) == (3e-4, 1e-2)
    features = TrainConfig(mode="features")
    assert (features.resolved().lr, features.resolved().weight_decay) == (1e-3, 0.05)
    explicit = TrainConfig(mode="features", lr=3e-4, weight_decay=0.01).resolved()
    assert (explicit.lr, explicit.weight_decay) == (3e-4, 0.01)
    assert TrainConfig().resolved().backbone == "efficientnet-b4"
    assert features.resolved().backbone == "efficientnet-lite2"
    assert TrainConfig(mode="features", backbone="efficientnet-lite0").resolved().backbone == "efficientnet-lite0"


@pytest.mark.parametrize(
    ("file_options", "flags", "words"),
    [
        ({}, {"mode": "finetune", "head": "mlp"}, ["--head applies only to features mode, not to finetune mode"]),
        ({}, {"mode": "features", "epochs": 3}, ["--epochs applies only to finetune mode"]),
        ({}, {"mode": "features", "head": "linear", "lr": 0.1}, ["--lr", "not to features mode with --head linear"]),
        ({"patience": 2}, {"mode": "features"}, ["'lcpn.toml' key patience applies only to finetune mode"]),
    ],
)
def test_options_the_mode_does_not_read_are_refused(file_options, flags, words):
    with pytest.raises(ConfigError) as caught:
        make_config(file_options, flags, "lcpn.toml")
    for word in words:
        assert word in str(caught.value)


def test_options_the_mode_reads_are_accepted():
    config = make_config({"epochs": 2}, {"lr": 0.01, "head": None})
    assert (config.mode, config.epochs, config.lr) == ("finetune", 2, 0.01)
    features = make_config({}, {"mode": "features", "head": "mlp", "lr": 0.01, "head_epochs": 3, "workers": 4})
    assert (features.lr, features.head_epochs, features.workers) == (0.01, 3, 4)  # workers: the embedding pass


def test_training_key_holds_only_the_options_the_mode_reads():
    finetune = TrainConfig()
    for change in ({"head": "linear"}, {"views": 1}, {"device": "cpu"}, {"workers": 0}, {"lr": 3e-4}):
        assert finetune.replace(**change).training_key() == finetune.training_key(), change
    for change in ({"lr": 1e-3}, {"epochs": 2}, {"batch_size": 8}, {"precision": "fp32"}):
        assert finetune.replace(**change).training_key() != finetune.training_key(), change
    features = TrainConfig(mode="features")
    for change in ({"epochs": 2}, {"patience": 1}, {"augment": False}, {"batch_size": 8}, {"cache": "x"}):
        assert features.replace(**change).training_key() == features.training_key(), change
    for change in ({"views": 1}, {"lr": 0.01}, {"head": "linear"}, {"precision": "fp32"}):
        assert features.replace(**change).training_key() != features.training_key(), change
    linear = features.replace(head="linear")
    assert linear.replace(lr=0.5, head_epochs=2, mlp_members=1).training_key() == linear.training_key()


@pytest.mark.parametrize(("given", "used"), [({}, (1e-3, 0.05)), ({"lr": 3e-4, "weight_decay": 0.01}, (3e-4, 0.01))])
def test_the_mlp_heads_use_the_lr_and_weight_decay_given(monkeypatch, given, used):
    from lcpn import artefacts, features

    seen = []
    real_adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, weight_decay: seen.append((lr, weight_decay))
                        or real_adamw(params, lr=lr, weight_decay=weight_decay))  # fmt: skip
    x, y = torch.randn(8, 4), torch.tensor([0, 1] * 4)
    hd = features.HeadData(x, y, x, y, [f"{i}.png" for i in range(8)], "val")
    config = TrainConfig(mode="features", head="mlp", head_epochs=1, **given)
    mlp = artefacts.build_head(NodeInfo(node="n", classes=["a", "b"], head={"type": "mlp", "hidden": 4}), 4)[1]
    features._fit_mlp(mlp, hd, 2, config, seed=0)
    assert seen == [used]


def test_a_node_trained_before_an_option_existed_counts_as_trained_with_its_before_value():
    config = TrainConfig(mode="finetune", freeze_bn=False)
    recorded = {k: v for k, v in config.training_key().items() if k != "freeze_bn"}  # a folder from before --freeze-bn
    assert config.trains_like(recorded)
    assert not config.replace(freeze_bn=True).trains_like(recorded)
    assert not config.trains_like({k: v for k, v in recorded.items() if k != "lr"})  # lr has no before value
    assert not config.trains_like(None) and config.trains_like(config.training_key())
