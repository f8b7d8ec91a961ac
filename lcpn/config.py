"""Training options: one frozen dataclass of defaults; a config file and the command line override it.

``OPTIONS`` is the one table of what each option accepts and which mode reads it: the ``lcpn train``
flags are made from it, and config-file values are checked against it, so a file cannot set what a
flag would refuse. An option that the chosen mode does not read is refused when it is given (in the
file or as a flag), and left out of ``training_key``, so changing it never retrains a node.

The final config is saved in every node's ``node.json`` and in ``hierarchy.json``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import click

from .errors import LcpnError
from .transforms import SQUARE_MODES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MODES = ("finetune", "features")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "bf16", "fp32")
HEADS = ("linear", "mlp", "ensemble")
INIT_HEADS = ("probe", "random")
MLP_HEADS = ("mlp", "ensemble")
# What each mode takes when --backbone / --lr / weight_decay are not given. A whole network is
# fine-tuned with small steps; a head on fixed embeddings takes larger ones and stronger decay.
# Features mode's backbone is the one that measured best on new product photos (docs/benchmarks.md),
# and its ImageNet weights ship with its package, so it works offline.
MODE_DEFAULTS = {
    # features mode has no batch size of its own: its embedding batches follow the device (feed.default_batch_size)
    "finetune": {"backbone": "efficientnet-b4", "lr": 3e-4, "weight_decay": 1e-2, "batch_size": 16},
    "features": {"backbone": "efficientnet-lite2", "lr": 1e-3, "weight_decay": 0.05},
}


class ConfigError(LcpnError):
    """A training option that cannot be used; the message names the option and where it came from."""


@dataclass(frozen=True)
class TrainConfig:
    mode: str = "finetune"  # finetune: a whole network per node; features: shared frozen backbone
    backbone: str | None = None  # None: the mode's (MODE_DEFAULTS): B4 to fine-tune, Lite2 for features
    pretrained: bool = True  # ImageNet weights (see backbones); False trains from scratch
    weights: str | None = None  # a local ImageNet checkpoint for the backbone
    image_size: int | None = None  # None: the backbone's own resolution (380 for B4, 224 for Lite0)
    square: str = "squash"  # how a picture becomes a square: squash, letterbox (pad white) or crop the centre
    epochs: int = 10  # finetune: upper bound; early stopping usually ends sooner
    batch_size: int | None = None  # None: 16 to fine-tune; features mode's embedding pass: the device's
    lr: float | None = None  # AdamW peak learning rate after the warm-up; None: the mode's (MODE_DEFAULTS)
    weight_decay: float | None = None  # AdamW weight decay; None: the mode's (MODE_DEFAULTS)
    warmup_epochs: float = 1.0  # linear warm-up, then cosine decay to zero
    label_smoothing: float = 0.1
    patience: int = 3  # finetune: epochs without a better val accuracy before stopping
    augment: bool = True  # finetune: random crops, flips and colour jitter on train images
    # finetune: "probe" starts from the node's linear probe (LP-FT). Off by default: on a CPU subset of the
    # catalogue's Footwear node it lost to a random layer (docs/benchmarks.md); a GPU run may decide otherwise.
    init_head: str = "random"
    wise_ft: bool = False  # finetune: keep the mix of the start and fine-tuned weights that scores best on val
    # finetune: BatchNorm keeps the pretrained statistics (eval mode) while the rest trains; on the CPU subset
    # of the catalogue's Footwear node every finetune recipe gained 4-8 points with it (docs/benchmarks.md)
    freeze_bn: bool = True
    device: str = "auto"
    # image-decoding worker processes: finetune training, features mode's embedding pass; None: feed.default_workers
    workers: int | None = None
    seed: int = 0
    head: str = "ensemble"  # features mode: "linear" (logistic regression, L2 chosen on val), "mlp", or
    # "ensemble": both, probabilities averaged (the most accurate in docs/benchmarks.md)
    head_epochs: int = 25  # features mode, mlp head: epochs over the cached embeddings
    mlp_members: int = 3  # features mode: MLPs (different seeds) averaged in an mlp or ensemble head
    refit: bool = True  # features mode, linear head: refit on train + val with the chosen L2 strength
    class_weights: bool = True  # finetune and MLP heads: the loss weighs each class by 1/sqrt(its frequency)
    linear_class_weights: bool = False  # features mode: the logistic regression weighs classes as the MLPs do
    temperature: bool = False  # features mode: the logistic regression's logits divided by a temperature fitted on val
    stage_features: int = 2  # features mode: pooled outputs of the backbone's last N stages join the embedding
    colour_features: bool = False  # features mode: a colour histogram of the input joins the embedding
    views: int = 2  # features mode: embeddings per training image (1 plain, 2 adds the mirror, 3+ crops)
    precision: str = "auto"  # finetune: auto is mixed precision on CUDA; features: auto is fp32 (bf16 by name)
    test_flips: bool = True  # features mode: predict from each picture and its mirror image, averaged
    cache: str | None = None  # features mode: embedding cache folder [default: <split>/embeddings]

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved(self) -> TrainConfig:
        """The config with the mode's defaults filled in where ``backbone`` / ``lr`` / ``weight_decay`` /
        ``batch_size`` are None."""
        defaults = MODE_DEFAULTS[self.mode]
        return self.replace(**{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def reads(self, name: str) -> bool:
        """True when this config's mode (and head) uses the option ``name``."""
        modes = OPTIONS[name].modes
        return self.mode in modes or ("mlp heads" in modes and self.mode == "features" and self.head in MLP_HEADS)

    def training_key(self) -> dict[str, Any]:
        """The options that change a trained node: those its mode reads, less where and how fast it runs."""
        runtime = {"device", "workers", "cache"} | ({"batch_size"} if self.mode == "features" else set())
        resolved = self.resolved()
        return {k: getattr(resolved, k) for k in OPTIONS if self.reads(k) and k not in runtime}

    def trains_like(self, recorded: dict | None) -> bool:
        """True when a node whose ``training_key`` is ``recorded`` was trained as this config would train it.

        A node trained before an option existed has no entry for it; it counts as trained with the
        option's ``before`` value (options without one retrain such a node)."""
        if recorded is None:
            return False
        key = self.training_key()
        missing = {k: OPTIONS[k].before for k in key.keys() - recorded.keys() if OPTIONS[k].before is not NEW}
        return {**missing, **recorded} == key


NEW = object()  # Option.before of an option that models trained without it cannot be matched to


@dataclass(frozen=True)
class Option:
    """What an option accepts (a click type, also used on config-file values) and which modes read it."""

    type: click.ParamType
    help: str
    modes: tuple[str, ...] = MODES  # "mlp heads": features mode with an mlp or ensemble head
    flag: str | None = None  # the flag's spelling when it is not --<name>, e.g. a boolean's --x/--no-x
    before: Any = NEW  # what nodes trained before the option existed did (NEW: no such nodes, or unknown)


FINETUNE, FEATURES, MLP = ("finetune",), ("features",), ("finetune", "mlp heads")
OPTIONS: dict[str, Option] = {
    "mode": Option(click.Choice(MODES), "finetune: fine-tune a whole network per node (GPU territory); features: one "
                   "frozen shared backbone, cached embeddings, a small head per node (seconds on a CPU)."),
    "backbone": Option(click.STRING, "Network: efficientnet-b0 ... efficientnet-b7, or efficientnet-lite0/1/2 "
                       "(their pretrained weights ship with their packages)."),
    "pretrained": Option(click.BOOL, "Start from ImageNet weights, or train from scratch (finetune mode; "
                         "features mode needs them).", flag="--pretrained/--no-pretrained"),
    "weights": Option(click.Path(dir_okay=False), "A local ImageNet checkpoint for the backbone (instead of the "
                      "hub cache or a download)."),
    "image_size": Option(click.IntRange(min=16), "Input resolution [default: the backbone's own, 380 for B4, "
                         "224 for Lite0]."),
    "square": Option(click.Choice(SQUARE_MODES), "How a picture becomes the square input, stored with the model: "
                     "squash (stretch), letterbox (pad with white, proportions kept) or crop (the centre)."),
    "epochs": Option(click.IntRange(min=1), "finetune mode: most epochs per node.", FINETUNE),
    "batch_size": Option(click.IntRange(min=1), "Images per batch (features mode: per embedding batch, "
                         "256 on a GPU and 32 on the CPU unless given)."),
    "lr": Option(click.FloatRange(min=0, min_open=True), "AdamW peak learning rate (finetune, and features "
                 "mode's MLP heads).", MLP),
    "weight_decay": Option(click.FloatRange(min=0), "AdamW weight decay (finetune, and features mode's MLP "
                           "heads).", MLP),
    "warmup_epochs": Option(click.FloatRange(min=0), "Epochs of linear learning-rate warm-up before the cosine "
                            "decay (finetune, and features mode's MLP heads).", MLP),
    "label_smoothing": Option(click.FloatRange(0, 1, max_open=True), "Label smoothing of the loss (finetune, "
                              "and features mode's MLP heads).", MLP),
    "patience": Option(click.IntRange(min=1), "finetune mode: stop a node after this many epochs without a "
                       "better val accuracy.", FINETUNE),
    "augment": Option(click.BOOL, "finetune mode: random crops, flips and colour jitter on train images.",
                      FINETUNE, flag="--augment/--no-augment"),
    "init_head": Option(click.Choice(INIT_HEADS), "finetune mode: the classification layer fine-tuning starts "
                        "from: probe fits a logistic regression on the pretrained network's features first "
                        "(LP-FT, Kumar et al. 2022: the pretrained features are distorted less); random.",
                        FINETUNE),
    "wise_ft": Option(click.BOOL, "finetune mode: after fine-tuning, try mixes (1 - a) * start + a * fine-tuned "
                      "of the weights for a in 0, 0.25, 0.5, 0.75, 1 and keep the best on val (WiSE-FT, "
                      "Wortsman et al. 2022).", FINETUNE, flag="--wise-ft/--no-wise-ft"),
    "freeze_bn": Option(click.BOOL, "finetune mode: BatchNorm layers keep their pretrained running statistics "
                        "while training (their scale and shift still learn): small batches' statistics are noisy, "
                        "and a linear probe (--init-head probe) was fitted on the pretrained ones.", FINETUNE,
                        flag="--freeze-bn/--no-freeze-bn", before=False),
    "device": Option(click.Choice(DEVICES), "Where to train; auto picks CUDA, then MPS, then the CPU."),
    "workers": Option(click.IntRange(min=0), "Image-decoding worker processes (finetune training, features "
                      "mode's embedding pass; 0: in this process; default: the CPU cores, at most 4, or all "
                      "but one, at most 16, on a machine with a GPU)."),
    "seed": Option(click.INT, "Random seed."),
    "head": Option(click.Choice(HEADS), "features mode: the per-node head: a logistic regression, a bag of MLPs "
                   "(--mlp-members), or both averaged.", FEATURES),
    "head_epochs": Option(click.IntRange(min=1), "features mode: epochs of each MLP head.", ("mlp heads",)),
    "mlp_members": Option(click.IntRange(min=1), "features mode: MLPs trained with different seeds and averaged "
                          "in an mlp or ensemble head.", ("mlp heads",)),
    "refit": Option(click.BOOL, "features mode: refit the heads on train + val with the setting chosen on val.",
                    FEATURES, flag="--refit/--no-refit"),
    "class_weights": Option(click.BOOL, "The loss weighs each class by 1/sqrt(its training frequency), capped "
                            "at 10x the largest class's weight (finetune, and features mode's MLP heads): rare "
                            "classes are not drowned by common ones, at some cost in accuracy on a skewed mix.",
                            MLP, flag="--class-weights/--no-class-weights", before=True),
    "linear_class_weights": Option(click.BOOL, "features mode: the logistic regression weighs each class by "
                                   "1/sqrt(its frequency), capped, as the MLP heads do.", FEATURES,
                                   flag="--linear-class-weights/--no-linear-class-weights"),
    "temperature": Option(click.BOOL, "features mode: divide the logistic regression's logits by a temperature "
                          "fitted on val (lowest val log-loss; folded into its weights), for calibrated "
                          "probabilities in best-path decoding and --adapt-priors.", FEATURES,
                          flag="--temperature/--no-temperature"),
    "stage_features": Option(click.IntRange(min=0), "features mode: append the pooled outputs of the backbone's "
                             "last N stages to its final features (0: the final features only; same single "
                             "pass).", FEATURES),
    "colour_features": Option(click.BOOL, "features mode: a histogram of the product's colours (read off the "
                              "backbone's input, the white background left out) joins the embedding of the heads "
                              "trained in this run: ImageNet features hardly tell colours apart. Chosen per head: "
                              "'--attribute baseColour --colour-features' leaves the other heads as they are.",
                              FEATURES,
                              flag="--colour-features/--no-colour-features"),
    "views": Option(click.IntRange(min=1), "features mode: embeddings per training image: 1 plain, 2 adds its "
                    "mirror image, 3+ add random crops (val images and prediction use the plain view).", FEATURES),
    "precision": Option(click.Choice(PRECISIONS), "fp32, or bf16 autocast; auto: finetune mode uses mixed "
                        "precision on CUDA (fp32 elsewhere), features mode embeds in fp32 (bf16 only by name: "
                        "about 2.7x faster on CPUs with AVX512-BF16, not on an H100)."),
    "test_flips": Option(click.BOOL, "features mode: at prediction, heads also read each picture's mirror image "
                         "and their probabilities are averaged (stored with the model; twice the backbone work; "
                         "+0.1 to +0.7 point of path accuracy on the OOD set, docs/benchmarks.md).", FEATURES,
                         flag="--test-flips/--no-test-flips"),
    "cache": Option(click.Path(file_okay=False), "features mode: the embedding cache folder [default: "
                    "<data>/embeddings].", FEATURES),
}  # fmt: skip
assert set(OPTIONS) == {f.name for f in fields(TrainConfig)}, "every option needs a row in OPTIONS"

_WHO_READS = {"finetune": "finetune mode", "features": "features mode", "mlp heads": "features mode's MLP heads"}


def default_text(name: str) -> str:
    """The default of an option as shown in its help."""
    if name in MODE_DEFAULTS["finetune"]:
        return " [default: " + ", ".join(f"{d[name]} in {m} mode" for m, d in MODE_DEFAULTS.items() if name in d) + "]"
    default = getattr(TrainConfig(), name)
    return "" if default is None else f" [default: {default}]"  # None: the help says what happens


def check_value(name: str, value: Any, where: str) -> Any:
    """``value`` converted by the option's type; a ConfigError names ``where`` it came from."""
    option = OPTIONS[name]
    try:
        converted = option.type.convert(value, None, None)
    except click.BadParameter as exc:
        raise ConfigError(f"{where}: {exc.message.rstrip('.')}") from None
    # click also turns "3" into 3 and 2.5 into 2; a file holds typed values, so a type change is a mistake
    widened = isinstance(converted, float) and type(value) is int
    if type(converted) is not type(value) and not widened:
        raise ConfigError(f"{where}: expected {option.type.name}, got {value!r}")
    return converted


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a TOML or JSON file (keys as on the command line, with - or _), checked like flags."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # TOMLDecodeError is a ValueError
        raise ConfigError(f"cannot read the config file '{path}': {exc}") from None
    data = data.get("train", data)  # options may sit under a [train] table
    options = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} in '{path}'; known options: {', '.join(OPTIONS)}")
    return {k: check_value(k, v, f"'{path}' key {k}") for k, v in options.items()}


def make_config(
    file_options: dict[str, Any], cli_options: dict[str, Any], file: str | Path | None = None
) -> TrainConfig:
    """Defaults, then the file, then the command line (options given as None are not set).

    An option given in either place that the chosen mode does not read is refused.
    """
    flags = {k: v for k, v in cli_options.items() if v is not None}
    config = TrainConfig(**{**file_options, **flags})
    for name in {**file_options, **flags}:
        if not config.reads(name):
            where = f"--{name.replace('_', '-')}" if name in flags else f"'{file}' key {name}"
            readers = " and ".join(_WHO_READS[m] for m in OPTIONS[name].modes)
            used = f"{config.mode} mode" + (f" with --head {config.head}" if config.mode == "features" else "")
            raise ConfigError(f"{where} applies only to {readers}, not to {used}; leave it out")
    return config
