"""The ``lcpn`` command line: thin click commands over the library modules."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import click

from . import __version__
from .sources import SourceError, scan_csv, scan_tree


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option(
    "--seed", default=0, show_default=True, help="Seed of the split; the same seed gives the same split."
)
@click.option(
    "--min-images",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Drop leaves with fewer images than this (reported).",
)
@click.option(
    "--csv",
    "csv_file",
    type=click.Path(path_type=Path),
    help="Take labels from this CSV instead of a folder tree.",
)
@click.option("--levels", help="With --csv: label columns, top level first, comma-separated.")
@click.option("--path-column", default="path", show_default=True, help="With --csv: column of image paths.")
@click.option(
    "--image-root",
    type=click.Path(path_type=Path),
    help="With --csv: folder that relative image paths start from [default: the CSV's folder].",
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
    materialize: str | None,
) -> None:
    """Split a labelled image collection once into per-node train/val sets and a test set.

    SOURCE is a folder tree of any depth: each folder is a class and images sit in the leaf
    folders (files next to sub-folders are excluded and reported). With --csv, the tree comes
    from the --levels columns instead. Every image is decoded; unreadable files are excluded with
    their reason, byte-identical files stay on one side of the split, and leaves too small to
    split stay in train.
    """
    from .prepare import format_summary
    from .prepare import prepare as run_prepare

    if val + test >= 1:
        raise click.UsageError("--val and --test together must leave some images for training.")
    try:
        if csv_file is not None:
            if source is not None:
                raise click.UsageError("give either SOURCE or --csv, not both.")
            if not levels:
                raise click.UsageError("--csv needs --levels, e.g. --levels masterCategory,subCategory.")
            level_list = [c.strip() for c in levels.split(",") if c.strip()]
            items, excluded = scan_csv(csv_file, level_list, path_column, image_root)
            described = f"{csv_file} [{','.join(level_list)}]"
        else:
            if source is None:
                raise click.UsageError("give a SOURCE folder, or --csv FILE --levels ...")
            items, excluded = scan_tree(source)
            described = str(source)
        start = time.perf_counter()
        result = run_prepare(items, excluded, out, described, val, test, seed, min_images, materialize)
    except (SourceError, ValueError) as exc:
        raise click.UsageError(f"{exc}.") from None
    click.echo(format_summary(result.summary, result.split.hierarchy, out))
    click.echo(f"\nDone in {time.perf_counter() - start:.1f} s.")
