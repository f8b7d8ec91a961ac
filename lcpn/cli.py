"""The ``lcpn`` command line: thin click commands over the library modules."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import click

from . import __version__
from .errors import LcpnError
from .sources import scan_csv, scan_tree, with_attributes


class _Command(click.Command):
    """A command whose ``LcpnError`` is printed like a usage error: one sentence, exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LcpnError as exc:
            message = str(exc)
            raise click.UsageError(message if message.endswith((".", "?", "!")) else f"{message}.", ctx) from None


class _Group(click.Group):
    command_class = _Command


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lcpn")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details to stderr.")
def main(verbose: bool) -> None:
    """Hierarchical image classification with one classifier per parent node (LCPN).

    The pipeline: `lcpn prepare` splits a labelled folder tree or CSV once, `lcpn train` fits a
    classifier per parent node, `lcpn predict` routes images down the tree, and `lcpn evaluate`
    measures the whole cascade.
    """
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def _csv_source_options(command):
    """--csv FILE --levels ... [--path-column] [--image-root]: labels from a CSV instead of folders."""
    options = [
        click.option("--csv", "csv_file", type=click.Path(path_type=Path),
                     help="Take labels from this CSV instead of a folder tree."),
        click.option("--levels", help="With --csv: label columns, top level first, comma-separated."),
        click.option("--path-column", default="path", show_default=True, help="With --csv: column of image paths."),
        click.option("--image-root", type=click.Path(path_type=Path),
                     help="With --csv: folder that relative image paths start from [default: the CSV's folder]."),
    ]  # fmt: skip
    for option in reversed(options):
        command = option(command)
    return command


def _scan_csv_source(csv_file: Path, levels: str | None, path_column: str, image_root: Path | None):
    """Labelled images from --csv; raises SourceError or a usage error."""
    if not levels:
        raise click.UsageError("--csv needs --levels, e.g. --levels masterCategory,subCategory.")
    level_list = [c.strip() for c in levels.split(",") if c.strip()]
    items, excluded = scan_csv(csv_file, level_list, path_column, image_root)
    return items, excluded, f"{csv_file} [{','.join(level_list)}]"


def _fraction(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not 0 <= value < 1:
        raise click.BadParameter("must be a fraction between 0 and 1 (e.g. 0.2)")
    return value


@main.command()
@click.argument("source", required=False, type=click.Path(path_type=Path))
@click.option(
    "--out",
    default="split_datasets",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Folder to write the split into (created if missing, files replaced).",
)
@click.option(
    "--val",
    default=0.2,
    show_default=True,
    callback=_fraction,
    help="Share of each leaf's images for validation.",
)
@click.option(
    "--test",
    default=0.1,
    show_default=True,
    callback=_fraction,
    help="Share of each leaf's images for the end-to-end test set.",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the split; the same seed gives the same split.")
@click.option(
    "--min-images",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Drop leaves with fewer images than this, and group attribute values with fewer into 'other' (reported).",
)
@_csv_source_options
@click.option(
    "--attributes",
    "attribute_names",
    help="Also record these CSV columns (comma-separated, e.g. gender,baseColour) as product attributes, each "
    "trained as a flat classifier beside the tree; an empty value leaves the image out of that attribute only.",
)
@click.option(
    "--attributes-csv",
    type=click.Path(path_type=Path),
    help="For a SOURCE folder: the CSV holding the --attributes columns, joined on its --path-column "
    "(relative to --image-root, default: the CSV's folder). With --csv the attributes come from that CSV.",
)
@click.option(
    "--materialize",
    type=click.Choice(["symlink", "copy"]),
    help="Also lay the split out as <node>/{train,val}/<class>/ image folders.",
)
def prepare(
    source: Path | None,
    out: Path,
    val: float,
    test: float,
    seed: int,
    min_images: int,
    csv_file: Path | None,
    levels: str | None,
    path_column: str,
    image_root: Path | None,
    attribute_names: str | None,
    attributes_csv: Path | None,
    materialize: str | None,
) -> None:
    """Split a labelled image collection once into per-node train/val sets and a test set.

    SOURCE is a folder tree of any depth: each folder is a class and images sit in the leaf
    folders (files next to sub-folders are excluded and reported). With --csv, the tree comes
    from the --levels columns instead. Every image is decoded; unreadable files are excluded with
    their reason, byte-identical files and near-identical pictures (by perceptual hash) stay on one
    side of the split, and leaves too small to split stay in train. The split replaces --out whole
    once it is complete. --attributes records product attributes (gender, colour, ...) per image,
    with train/val manifests per attribute that follow the same split.
    """
    from .attributes import parse_names
    from .prepare import format_summary
    from .prepare import prepare as run_prepare

    if val + test >= 1:
        raise click.UsageError("--val and --test together must leave some images for training.")
    if csv_file is not None:
        if source is not None:
            raise click.UsageError("give either SOURCE or --csv, not both.")
        items, excluded, described = _scan_csv_source(csv_file, levels, path_column, image_root)
    else:
        if source is None:
            raise click.UsageError("give a SOURCE folder, or --csv FILE --levels ...")
        items, excluded = scan_tree(source)
        described = str(source)
    names = parse_names(attribute_names)
    if attributes_csv is not None and (csv_file is not None or not names):
        raise click.UsageError("--attributes-csv goes with a SOURCE folder and --attributes.")
    if names:
        if csv_file is None and attributes_csv is None:
            raise click.UsageError("--attributes with a SOURCE folder needs --attributes-csv FILE.")
        items = with_attributes(items, csv_file or attributes_csv, names, path_column, image_root)
    start = time.perf_counter()
    result = run_prepare(items, excluded, out, described, val, test, seed, min_images, materialize, names)
    click.echo(format_summary(result.summary, result.split.hierarchy, out))
    click.echo(f"\nDone in {time.perf_counter() - start:.1f} s.")


def _train_options(command):
    """The training flags, made from config.OPTIONS: the table that also checks config-file values."""
    from .config import OPTIONS, default_text

    for name, option in reversed(OPTIONS.items()):
        flag = option.flag or "--" + name.replace("_", "-")
        command = click.option(flag, name, type=option.type, default=None, help=option.help + default_text(name))(
            command
        )
    return command


@main.command()
@click.option(
    "--data",
    default="split_datasets",
    show_default=True,
    type=click.Path(path_type=Path),
    help="A split made by `lcpn prepare`.",
)
@click.option(
    "--out",
    default="trained_models",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Folder for the trained models (one sub-folder per parent node).",
)
@click.option(
    "--node",
    "nodes",
    multiple=True,
    help="Train only this parent node (a path such as 'Apparel' or 'root'); repeatable.",
)
@click.option(
    "--attributes",
    "attribute_names",
    help="Attributes of the split to train beside the tree, comma-separated [default: all that `lcpn prepare "
    "--attributes` recorded; '' for none].",
)
@click.option(
    "--attribute",
    "only_attributes",
    multiple=True,
    help="Train only this attribute (with the --node nodes, if any), like --node for a node; repeatable.",
)
@_train_options
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path),
    help="TOML or JSON file of training options (same names as these flags, checked the same way); flags "
    "override it. An option that the chosen mode does not read is refused, in the file as on the command line.",
)
@click.option("--force", is_flag=True, help="Retrain nodes that are already trained, ignoring checkpoints.")
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="local",
    metavar="[ADDRESS]",
    help="Train every node as a task on a Ray cluster: --ray alone starts Ray on this machine, --ray ADDRESS "
    "joins a running cluster (auto, HOST:6379, ray://HOST:10001). The split, its images and --out must be on a "
    "path every machine of the cluster sees. Needs `pip install 'lcpn[ray]'`.",
)
def train(
    data: Path, out: Path, nodes: tuple[str, ...], attribute_names: str | None, only_attributes: tuple[str, ...],
    config_file: Path | None, force: bool, ray_address: str | None, **options,
) -> None:  # fmt: skip
    """Train one classifier per parent node of a prepared split, and one per attribute.

    Each node's folder gets model.pth, node.json, bin/*.pickle, performance.txt and plots; so
    does each attribute's, in attributes/<name>/ (a head on the shared backbone in features mode,
    a network of its own in finetune mode).
    Finished nodes are skipped and an interrupted node resumes after its last finished epoch, so
    running the same command again continues where it stopped. A node with a single child is
    recorded as constant and not trained. Two runs into the same --out never train one node at
    once: the second is refused with the first one's pid. With --ray each node is a Ray task, and
    a node whose worker is lost is retried.
    """
    from .attributes import parse_names
    from .backbones import spec
    from .config import make_config, read_config_file
    from .train import train_nodes

    if only_attributes and attribute_names is not None:
        raise click.UsageError("give --attributes (which attributes a full run trains) or --attribute (only these).")
    attributes = parse_names(attribute_names) if attribute_names is not None else None
    if only_attributes:
        attributes = parse_names(",".join(only_attributes))
    start = time.perf_counter()
    file_options = read_config_file(config_file) if config_file else {}
    config = make_config(file_options, options, config_file).resolved()
    try:
        spec(config.backbone)  # an unknown name is a ValueError that lists the known ones
    except ValueError as exc:
        raise click.UsageError(f"{exc}.") from None
    chosen = None if only_attributes and not nodes else nodes
    if ray_address:
        from .ray_engine import train_on_ray

        results = train_on_ray(data, out, config, chosen, force, attributes, ray_address)
    else:
        results = train_nodes(data, out, config, chosen, force, attributes)
    trained = sum(r.status == "trained" for r in results)
    seconds = time.perf_counter() - start
    if nodes or only_attributes:  # one of several runs (train_lcpn.sh runs one per node): say which, not a total
        names = ", ".join(r.node or "root" for r in results)
        click.echo(f"node {names}: ready in {out} ({trained} trained now, {seconds:.1f} s)")
    else:
        click.echo(f"\n{len(results)} node(s) ready in {out} ({trained} trained now) in {seconds:.1f} s.")


@main.command()
@click.option(
    "--models",
    default="trained_models",
    show_default=True,
    type=click.Path(path_type=Path),
    help="A folder written by `lcpn train`.",
)
def summary(models: Path) -> None:
    """Print one line per trained node and attribute: kind, classes, validation accuracy and macro F1, epochs.

    Every node is also loaded, weights included, as `lcpn predict` would: exit code 1 lists the
    nodes that cannot be loaded and why.
    """
    from .artefacts import ArtefactError, NodeInfo, read_info
    from .attributes import read_specs
    from .models import node_problems, read_tree
    from .report import format_table
    from .train import chosen_setting

    def val_scores(info: NodeInfo) -> list[str]:
        """Accuracy and macro F1, or why there are none: a constant node, or no val images."""
        m = info.metrics
        if info.kind == "constant":
            return ["constant", "-"]
        if not m.get("n") or not str(m.get("evaluated_on", "val")).startswith("val"):
            return ["no val images", "-"]
        return [f"{m[k]:.4f}" if isinstance(m.get(k), float) else "-" for k in ("accuracy", "macro_f1")]

    tree = read_tree(models)
    entries = [(node or "(root)", tree.folders[node], len(tree.children[node])) for node in tree.parents]
    entries += [(s.node, s.folder, len(s.values)) for s in read_specs(models).values()]
    rows = []
    for title, folder, n_classes in entries:
        try:
            info = read_info(models / folder)
        except ArtefactError:
            rows.append([title, "not trained", n_classes, None, None, None, None])
            continue
        kind = info.kind if info.kind == "constant" else info.mode
        rows.append([title, kind, len(info.classes), info.metrics.get("n"), *val_scores(info),
                     chosen_setting(info)])  # fmt: skip
    click.echo(format_table(rows, ["node", "kind", "classes", "val images", "val acc", "macro F1", "chosen"]))
    problems = node_problems(models)
    if problems:
        click.echo(f"\n{len(problems)} node(s) cannot be loaded, so `lcpn predict` refuses this folder:")
        for node, reason in problems.items():
            click.echo(f"  {node or '(root)'}: {reason}")
        sys.exit(1)


_models_option = click.option(
    "--models", default="trained_models", show_default=True, type=click.Path(path_type=Path),
    help="A model folder written by `lcpn train` (with --runtime onnx: by `lcpn export`).",
)  # fmt: skip
_device_option = click.option(
    "--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda", "mps"]),
    help="Where to run the networks; auto picks CUDA, then MPS, then the CPU.",
)  # fmt: skip
_precision_option = click.option(
    "--precision", default="as-trained", show_default=True, type=click.Choice(["as-trained", "auto", "bf16", "fp32"]),
    help="as-trained: each network in the precision it was trained in (recorded in its node.json; float32 "
    "where none is); or for every network: float32, bfloat16 autocast, or auto: bf16 where the CPU or GPU "
    "supports it natively (see docs/benchmarks.md for the measured agreement with fp32).",
)  # fmt: skip
_decode_option = click.option(
    "--decode", default="best-path", show_default=True, type=click.Choice(["best-path", "greedy"]),
    help="best-path: the full path with the highest product of probabilities; greedy: the most probable "
    "child at each level (the classic behaviour).",
)  # fmt: skip
_min_conf_option = click.option(
    "--min-confidence", default=0.0, show_default=True, type=click.FloatRange(0, 1),
    help="Stop descending where the chosen child's probability is below this and return the partial path "
    "(the top-level decision is always given).",
)  # fmt: skip
_adapt_option = click.option(
    "--adapt-priors", is_flag=True,
    help="Re-estimate each node's class mix on all the images given (EM, Saerens et al. 2002) and correct "
    "its probabilities for it: for a batch whose mix differs from the training images' (a new season, "
    "another shop). Needs logistic-regression heads (train with --head linear). Every node then runs on "
    "every image, and nothing is printed before all are done.",
)  # fmt: skip
_batch_option = click.option("--batch-size", type=click.IntRange(min=1),
                             help="Images per batch [default: 256 on a GPU, 32 on the CPU].")  # fmt: skip
_workers_option = click.option(
    "--workers", type=click.IntRange(min=0),
    help="Processes that decode and transform the images while the networks run (0: in this process) "
    "[default: the CPU cores, at most 4, or all but one, at most 16, on a machine with a GPU].",
)  # fmt: skip
_runtime_option = click.option(
    "--runtime", default="torch", show_default=True, type=click.Choice(["torch", "onnx"]),
    help="torch: a folder written by `lcpn train`; onnx: a folder written by `lcpn export`, run with onnxruntime "
    "on the CPU (its files are checked against their sha256 first).",
)  # fmt: skip


def _batch_size(batch_size: int | None, device: str, runtime: str) -> int:
    """--batch-size, else the default for where the networks run (onnx: the CPU)."""
    from .devices import resolve_device
    from .feed import default_batch_size

    return batch_size or default_batch_size(resolve_device(device if runtime == "torch" else "cpu"))


@main.command()
# readable=False: an unreadable file gets its own error line like any bad image, not a usage error.
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path, readable=False))
@_models_option
@click.option(
    "--top-k",
    default=1,
    show_default=True,
    type=click.IntRange(min=0),
    help="Also list the K most probable full paths (0: none).",
)
@_min_conf_option
@_decode_option
@_adapt_option
@_batch_option
@_workers_option
@_device_option
@_precision_option
@_runtime_option
@click.option(
    "--format",
    "fmt",
    default="text",
    show_default=True,
    type=click.Choice(["text", "json", "csv"]),
    help="text: one line per image; json: one JSON object per line; csv: one row per image.",
)
@click.option(
    "--attributes/--no-attributes",
    default=True,
    show_default=True,
    help="Also name the product attributes (gender, colour, ...) that the model folder has classifiers for.",
)
def predict(inputs, models, top_k, min_confidence, decode, adapt_priors, batch_size, workers, device, precision,
            runtime, fmt, attributes) -> None:  # fmt: skip
    """Name the class of images at every level of the tree.

    INPUTS are image files or folders (searched recursively). Every node model is loaded once and
    images are routed down the tree in batches. An unreadable or missing image gets its own error
    and the others are still predicted. Exit code: 0 when every image was predicted, 1 when any
    failed, 2 on usage errors (among them: none of INPUTS exists).
    """
    from .cascade import open_cascade
    from .feed import collect_images
    from .output import write_predictions

    paths = collect_images(inputs)
    cascade = open_cascade(models, runtime, device, precision, attributes)
    batch_size = _batch_size(batch_size, device, runtime)
    predictions = cascade.predict(paths, batch_size, top_k, decode, min_confidence, workers, adapt_priors=adapt_priors)
    failed = write_predictions(predictions, fmt, cascade.tree.max_depth, top_k, sys.stdout, list(cascade.attributes))
    if failed:
        click.echo(f"{failed} of {len(paths)} image(s) could not be predicted.", err=True)
        sys.exit(1)


@main.command()
@click.argument("data", required=False, type=click.Path(path_type=Path))
@_models_option
@_csv_source_options
@click.option(
    "--out",
    default="evaluation",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Folder for metrics.json, nodes.csv, leaves.csv and the confusion-matrix plots.",
)
@click.option(
    "--attributes-csv",
    type=click.Path(path_type=Path),
    help="For a DATA folder tree: a CSV with the true values of the models' attributes, joined on its "
    "--path-column (relative to --image-root, default: its folder). A split or --csv brings its own.",
)
@click.option(
    "--format",
    "fmt",
    default="text",
    show_default=True,
    type=click.Choice(["text", "json"]),
    help="text: a readable report; json: metrics.json on stdout.",
)
@_decode_option
@_min_conf_option
@_adapt_option
@_batch_option
@_workers_option
@_device_option
@_precision_option
@_runtime_option
def evaluate(data, models, csv_file, levels, path_column, image_root, out, attributes_csv, fmt, decode,
             min_confidence, adapt_priors, batch_size, workers, device, precision, runtime) -> None:  # fmt: skip
    """Measure the whole cascade on labelled images.

    DATA is a split folder from `lcpn prepare` (its end-to-end test set is used) or a labelled
    folder tree; or give --csv FILE --levels ... instead. Reports accuracy per level, full-path
    accuracy, hierarchical precision/recall/F1, mistake severity, error propagation per node and
    precision/recall/F1 per leaf. Files left out (excluded by the source, unreadable, or of classes
    the model does not know) are listed with their reason. A warning says when some images are
    ones the models were trained on (identical files or near-duplicates). Attributes the models
    have classifiers for are scored where the data gives their values (a split's test.csv, the
    --csv columns of the same names, or --attributes-csv).
    """
    import json

    from .cascade import open_cascade
    from .evaluate import evaluate as run_evaluate
    from .evaluate import format_metrics, overlap_warning, split_test_items
    from .overlap import NoTrainingRecord, TrainingImages

    excluded = []
    if csv_file is not None:
        items, excluded, _ = _scan_csv_source(csv_file, levels, path_column, image_root)
    elif data is None:
        raise click.UsageError("give DATA (a split folder or a labelled folder tree), or --csv FILE --levels ...")
    elif (data / "test.csv").is_file() and (data / "hierarchy.json").is_file():
        items = split_test_items(data)
    else:
        items, excluded = scan_tree(data)
    if not items:
        raise click.UsageError("there are no images to evaluate on.")
    cascade = open_cascade(models, runtime, device, precision)
    values_csv = csv_file or attributes_csv
    if cascade.attributes and values_csv is not None:
        items = with_attributes(items, values_csv, list(cascade.attributes), path_column, image_root, required=False)
    try:
        training = TrainingImages.of_models(models)
    except NoTrainingRecord as exc:
        training = None
        click.echo(f"Not checked whether the images were used in training: {exc}.", err=True)
    batch_size = _batch_size(batch_size, device, runtime)
    result = run_evaluate(cascade, items, out, batch_size, decode, min_confidence, excluded, training, workers,
                          adapt_priors)  # fmt: skip
    metrics = result.metrics
    if metrics["n_images"] == 0:
        reasons = "; ".join(f"{reason}: {n}" for reason, n in metrics["left_out"].items())
        raise click.UsageError(f"none of the images could be evaluated (left out: {reasons}).")
    warning = overlap_warning(metrics)
    if fmt == "json":
        click.echo(json.dumps(metrics, indent=2, ensure_ascii=False))
        if warning:
            click.echo(warning, err=True)
    else:
        click.echo(format_metrics(metrics))
        click.echo(f"\nWrote {out / 'metrics.json'}, nodes.csv, leaves.csv and confusion-matrix plots.")


@main.command("export")
@click.option(
    "--models",
    default="trained_models",
    show_default=True,
    type=click.Path(path_type=Path),
    help="A model folder written by `lcpn train`.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder for the ONNX files, hierarchy.json and manifest.json (replaced whole once complete).",
)
@click.option(
    "--format",
    "fmt",
    default="onnx",
    show_default=True,
    type=click.Choice(["onnx"]),
    help="File format of the exported models.",
)
@click.option(
    "--quantize",
    type=click.Choice(["int8"]),
    help="int8: static quantisation of the backbone (per-channel weights, activations calibrated on images; the "
    "heads stay float32): smaller and faster; how often its paths equal float32's: docs/benchmarks.md.",
)
@click.option(
    "--calibration",
    type=click.Path(path_type=Path),
    help="With --quantize: a prepared split (its train images) or a folder of images to calibrate on "
    "[default: the split the models were trained on].",
)
@click.option(
    "--calibration-images",
    default=64,
    show_default=True,
    type=click.IntRange(1),
    help="With --quantize: how many calibration images, spread over the split's leaves or the folder.",
)
@click.option("--opset", default=17, show_default=True, type=click.IntRange(13, 20), help="ONNX opset to write.")
def export_command(models: Path, out: Path, fmt: str, quantize: str | None, calibration: Path | None,
                   calibration_images: int, opset: int) -> None:  # fmt: skip
    """Export a model folder to ONNX, for runtimes without PyTorch.

    Features mode becomes one graph (lcpn.onnx): the shared backbone and every node's head, one
    output of child probabilities per node, named '/' + node id ('/' is the root). Each fine-tuned
    node becomes nodes/<folder>.onnx. Beside them: hierarchy.json and manifest.json (the files and
    their sha256, each node's classes and output, the input's size, mean, std and square mode).
    Serve the folder with `lcpn predict --runtime onnx --models OUT`, or from any ONNX runtime.
    """
    from .export import export

    if calibration is not None and quantize is None:
        raise click.UsageError("--calibration is read only with --quantize int8.")
    start = time.perf_counter()
    manifest = export(models, out, quantize, opset, calibration, calibration_images)
    for name in manifest["models"]:
        click.echo(f"{out / name}  {(out / name).stat().st_size / 2**20:.1f} MiB")
    click.echo(f"Exported {len(manifest['nodes'])} node(s) to {out} in {time.perf_counter() - start:.1f} s.")


@main.command()
@_models_option
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; 0.0.0.0 opens the server to the network (set a token first).",
)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option(
    "--max-batch",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Most images of concurrent requests routed through the cascade as one batch.",
)
@click.option(
    "--max-wait-ms",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="How long the first image of a batch waits for others to join it.",
)
@click.option(
    "--max-files",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Most files in one request; more is refused with 413.",
)
@click.option(
    "--max-file-mb",
    default=20.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Largest file accepted, in MB; a larger one is refused with 413.",
)
@_device_option
@_precision_option
@_runtime_option
@click.option(
    "--token-env",
    metavar="NAME",
    help="Name of an environment variable holding a token: every /v1/ request must then send "
    "'Authorization: Bearer <token>'. The page, /healthz and /docs stay open.",
)
def serve(models, host, port, max_batch, max_wait_ms, max_files, max_file_mb, device, precision, runtime,
          token_env) -> None:  # fmt: skip
    """Serve the models over HTTP: a JSON API with dynamic batching, Grad-CAM explanations and a web page.

    POST /v1/predict (multipart 'files') answers what `lcpn predict --format json` prints, one
    object per file; POST /v1/explain (multipart 'file') adds a Grad-CAM heatmap for every stage of
    the path; GET /v1/model describes the tree; GET / is the page; GET /docs documents the API.
    Every node model is loaded before the server starts: a folder that cannot be served stops here.
    With --runtime onnx (an `lcpn export` folder) explanations are not available: they need the
    trained PyTorch models.
    """  # fmt: skip
    import os

    import uvicorn

    from .serve import create_app
    from .serve.limits import Limits

    token = None
    if token_env:
        token = os.environ.get(token_env, "").strip()
        if not token:
            raise click.UsageError(f"--token-env names {token_env}, but that environment variable is not set.")
    elif host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: serving on {host} without a token (--token-env): anyone who reaches it can use it",
                   err=True)  # fmt: skip
    app = create_app(models, device=device, precision=precision, runtime=runtime, max_batch=max_batch,
                     max_wait_ms=max_wait_ms, limits=Limits(max_files, max_file_mb), token=token)  # fmt: skip
    click.echo(f"Serving {models} on http://{host}:{port}/ (API documentation at /docs); Ctrl+C stops.", err=True)
    uvicorn.run(app, host=host, port=port, log_level="info")


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path, readable=False))
@_models_option
@click.option(
    "--out",
    default="explanations",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Folder for one PNG per stage of every image and contact_sheet.png.",
)
@_decode_option
@_min_conf_option
@_device_option
@_precision_option
def explain(inputs, models, out, decode, min_confidence, device, precision) -> None:
    """Show where each node looked: a Grad-CAM heatmap for every stage of every image's predicted path.

    INPUTS are image files or folders (searched recursively). For the N-th image, OUT/N_<name>/
    gets one PNG per stage (the image, the heatmap over it, the node, the chosen class and its
    probability), and OUT/contact_sheet.png shows every image with its stages in one row. A
    constant node (a single child) decides nothing and gets no heatmap. Exit code 1 when any image
    could not be used.
    """  # fmt: skip
    from .cascade import Cascade
    from .explain import Explainer, save_contact_sheet, save_stage_figure, stage_title
    from .feed import collect_images, open_source
    from .hierarchy import safe_folder_name
    from .images import ImageError
    from .progress import progress

    paths = collect_images(inputs)
    cascade = Cascade.load(models, device, precision)
    explainer = Explainer(cascade, models)
    rows, failed, bar = [], 0, progress(len(paths), "explaining")
    for i, path in enumerate(paths):
        image = open_source(path)
        bar.update(1)
        if isinstance(image, ImageError):
            failed += 1
            click.echo(f"{path}  ERROR: {image}")
            continue
        explanation = explainer.explain(image, 1, decode, min_confidence)
        folder = out / f"{i + 1:0{len(str(len(paths)))}d}_{safe_folder_name(Path(path).stem)}"
        for level, stage in enumerate(explanation.stages, 1):
            save_stage_figure(folder / f"stage{level}_{safe_folder_name(stage.chosen)}.png", image, stage)
        rows.append((path, image, explanation.stages))
        notes = [stage_title(s) + (f" [{s.note}]" if s.note else "") for s in explanation.stages]
        click.echo(f"{path}  " + "; ".join(notes) + f"  -> {folder}")
    bar.close()
    if rows:
        save_contact_sheet(out / "contact_sheet.png", rows)
        click.echo(f"Wrote {out / 'contact_sheet.png'}.")
    if failed:
        click.echo(f"{failed} of {len(paths)} image(s) could not be explained.", err=True)
        sys.exit(1)
