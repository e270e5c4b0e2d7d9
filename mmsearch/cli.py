"""The ``mmsearch`` command: thin Typer commands over the library.

Results go to stdout (``--json``: one JSON object per line); progress, skipped
files and errors go to stderr. Every expected failure is one ``error:`` line
and a non-zero exit.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, TypeVar

import typer

from mmsearch import __version__
from mmsearch.errors import MmsearchError, UsageError
from mmsearch.settings import DEFAULT_MODEL, Settings, resolve

app = typer.Typer(
    name="mmsearch",
    help="Search your images and texts by meaning: text→image, image→image, image→text, text→text.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(fn: F) -> F:
    """Turn library errors into one stderr line and the error's exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MmsearchError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted; what was finished is kept", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def show_path(path: str) -> str:
    """A path printable on any terminal (undecodable bytes shown as escapes)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def warn(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def echo_json(obj: Any) -> None:
    line = json.dumps(obj, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        # a file name that is not UTF-8: JSON's \udcXX escapes keep it exact
        # (json.loads gives back the str that os functions take) and printable
        line = json.dumps(obj, ensure_ascii=True)
    typer.echo(line)


def settings_of(ctx: typer.Context) -> Settings:
    return ctx.obj


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"mmsearch {__version__}")
        raise typer.Exit()


@app.callback()
@handle_errors
def main_options(
    ctx: typer.Context,
    home: Optional[Path] = typer.Option(
        None, "--home", metavar="DIR",
        help="Where the catalog and indexes live. Env: MMSEARCH_HOME. Default: a per-user data folder.",
    ),
    model: Optional[str] = typer.Option(
        None, "--model", metavar="SPEC",
        help=(
            "Model: NAME:TAG, hf-hub:ORG/REPO, a model folder (local-dir:DIR or DIR) or NAME:/path/to/weights. "
            f"Env: MMSEARCH_MODEL. Default: the home's model, else {DEFAULT_MODEL}."
        ),
    ),
    device: Optional[str] = typer.Option(
        None, "--device", metavar="DEV", help="torch device: auto, cpu, cuda, cuda:1, mps. Env: MMSEARCH_DEVICE."
    ),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", metavar="N", help="Images per encoder batch. Env: MMSEARCH_BATCH_SIZE. Default: 32."
    ),
    workers: Optional[int] = typer.Option(
        None, "--workers", metavar="N", help=(
            "Indexing threads. On the CPU: lanes that each decode and encode a batch, sharing the cores; "
            "on a GPU: decode threads feeding it; 0: all in one thread. Env: MMSEARCH_WORKERS. Default: min(4, cores)."
        ),
    ),
    int8: bool = typer.Option(
        False, "--int8",
        help=(
            "Encode images with int8 dynamic quantisation (CPU only): ~1.5x faster image encoding with ViT-B-32 "
            "(~1.25x faster indexing), embeddings within cosine ~0.9997 of float32; off by default until shown "
            "equal on pretrained weights. Env: MMSEARCH_INT8=1."
        ),
    ),
    version: bool = typer.Option(
        False, "--version", callback=version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Search your images and texts by meaning."""
    from mmsearch.runtime import route_logging

    route_logging()
    ctx.obj = resolve(home=home, model=model, device=device, batch_size=batch_size, workers=workers, int8=int8 or None)


@app.command()
@handle_errors
def index(
    ctx: typer.Context,
    paths: list[Path] = typer.Argument(..., metavar="PATH...", help="Folders (searched recursively) or image files."),
    as_json: bool = typer.Option(False, "--json", help="Print the counts as one JSON object on the last line."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    strict: bool = typer.Option(False, "--strict", help="Exit non-zero (3) if any file was skipped."),
) -> None:
    """Embed every image under PATH...; unchanged files are not read again."""
    from mmsearch.home import Home
    from mmsearch.indexer import index_paths
    from mmsearch.runtime import prepare_model_access, share_cores_with_decoding, threads_for_lanes

    share_cores_with_decoding()  # before torch loads (an unchanged folder never loads it)
    with Home.open(settings_of(ctx)) as home:
        home.before_model_load = prepare_model_access
        report = index_paths(
            home, paths, progress=not quiet, on_lanes=threads_for_lanes,
            on_skip=lambda path, reason: warn(f"skipped {show_path(path)}: {reason}"),
        )
    if as_json:
        echo_json(report.as_dict())
    else:
        typer.echo(
            f"added {report.added}, updated {report.updated}, unchanged {report.unchanged}, "
            f"removed {report.removed}, skipped {report.skipped} ({report.seconds:.1f} s)"
        )
    if strict and report.skipped:
        raise typer.Exit(3)


@app.command("add-texts")
@handle_errors
def add_texts(
    ctx: typer.Context,
    file: Path = typer.Argument(..., metavar="FILE", help=".txt (a text per line), .jsonl (text, id, ...) or .csv (text, id columns)."),
    as_json: bool = typer.Option(False, "--json", help="Print the counts as one JSON object."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Add a text corpus; texts with a known id are replaced, unchanged ones kept."""
    from mmsearch.home import Home
    from mmsearch.texts import add_texts as add

    from mmsearch.runtime import prepare_model_access

    with Home.open(settings_of(ctx)) as home:
        home.before_model_load = prepare_model_access
        report = add(home, file, progress=not quiet, on_warning=warn)
    if as_json:
        echo_json(report.as_dict())
    else:
        typer.echo(
            f"added {report.added}, updated {report.updated}, unchanged {report.unchanged}, "
            f"skipped {report.skipped} empty, {report.duplicates} duplicate ids ({report.seconds:.1f} s)"
        )


@app.command()
@handle_errors
def search(
    ctx: typer.Context,
    query: Optional[str] = typer.Argument(
        None, metavar="[QUERY]", help='Text; terms may be summed: "cat + 2:snow - dog" (image paths allowed as terms).'
    ),
    image: Optional[Path] = typer.Option(None, "--image", "-i", metavar="FILE", help="Search by this example image."),
    texts: bool = typer.Option(False, "--texts", "-t", help="Return texts instead of images."),
    top_k: int = typer.Option(10, "--top-k", "-k", metavar="N", help="How many results."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per result line, best first."),
    rerank: bool = typer.Option(
        False, "--rerank", help="Re-score the best candidates with the model's cross-attention re-ranker."
    ),
    rerank_k: int = typer.Option(50, "--rerank-k", metavar="K", help="How many candidates --rerank re-scores."),
    cutoff: Optional[str] = typer.Option(
        None, "--cutoff", metavar="auto|NUMBER",
        help="Leave out results whose relevance (calibrated, comparable across models) is below this; auto: the default threshold.",
    ),
) -> None:
    """Find images (or with --texts, texts) by a text query and/or an example image."""
    from mmsearch.home import Home
    from mmsearch.runtime import prepare_model_access, set_torch_threads
    from mmsearch.relevance import parse_cutoff
    from mmsearch.search import parse_query, search as run_search

    threshold = parse_cutoff(cutoff)
    if rerank and rerank_k < 1:
        raise typer.BadParameter(f"must be at least 1, got {rerank_k}", param_hint="--rerank-k")
    text_only = image is None and bool(query) and all(term.image is None for term in parse_query(query or ""))

    def before_model_load(spec: Any) -> None:
        if text_only:
            # a short text runs on one CPU thread: ~150 tiny ops that would each wait for
            # every thread of a team to be scheduled (bench/text_encode.py)
            set_torch_threads(1)
        prepare_model_access(spec)

    with Home.open(settings_of(ctx), create=False) as home:
        home.before_model_load = before_model_load
        hits = run_search(
            home, query, image=image, target="text" if texts else "image", k=top_k,
            rerank_k=rerank_k if rerank else 0, cutoff=threshold,
        )
    if not hits and threshold is not None:
        typer.echo("no good match", err=True)
        return
    if as_json:
        for hit in hits:
            echo_json(hit.as_dict())
        return
    if not hits:
        typer.echo("no results", err=True)
        return
    for hit in hits:
        shown = show_path(hit.path) if hit.path is not None else (hit.text or "")
        label = "" if hit.kind == "image" else f"[{hit.id}] "
        typer.echo(f"{hit.rank:>3}  {hit.score:6.3f}  {label}{shown}")


@app.command()
@handle_errors
def duplicates(
    ctx: typer.Context,
    kind: str = typer.Option(
        "near", "--kind", metavar="exact|near|similar",
        help="exact: the same bytes; near: the same picture re-encoded, resized, cropped or recoloured; "
        "similar: the same subject (a lower threshold).",
    ),
    threshold: Optional[float] = typer.Option(
        None, "--threshold", metavar="T",
        help="near: how alike two pictures' pixels must be (correlation, default 0.95); "
        "similar: the cosine similarity of their vectors (default 0.85).",
    ),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per group, best groups first."),
) -> None:
    """Find copies among the indexed images, as groups, best first."""
    from mmsearch.duplicates import find_duplicates
    from mmsearch.home import Home

    with Home.open(settings_of(ctx), create=False) as home:
        groups = find_duplicates(home, kind, threshold)
    if as_json:
        for group in groups:
            echo_json(group.as_dict())
        return
    if not groups:
        typer.echo(f"no {kind} duplicates", err=True)
        return
    for number, group in enumerate(groups, 1):
        typer.echo(f"group {number}  {group.kind}  {group.score:.3f}  ({len(group.items)} images)")
        for item_id, path in group.items:
            typer.echo(f"    {item_id:>8}  {show_path(path)}")


@app.command()
@handle_errors
def status(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """What this home holds: model, counts, sizes."""
    from mmsearch.home import status as home_status

    info = home_status(settings_of(ctx))
    if as_json:
        echo_json(info)
        return
    if not info["exists"]:
        typer.echo(f"home: {info['home']} (empty: nothing indexed yet)")
        return
    typer.echo(f"home:    {info['home']}")
    typer.echo(f"model:   {info['model'] or '(none yet)'}" + (f"  ({info['dim']}-d)" if info["dim"] else ""))
    typer.echo(f"images:  {info['images']}")
    typer.echo(f"texts:   {info['texts']}")
    typer.echo(f"on disk: {_size(int(info['disk_bytes']))}")


@app.command()
@handle_errors
def check(
    ctx: typer.Context,
    repair: bool = typer.Option(False, "--repair", help="Rebuild every index that differs from the catalog."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
) -> None:
    """Verify that catalog, indexes and files agree; exit 1 if a problem remains."""
    from mmsearch.check import check_home

    report = check_home(settings_of(ctx), repair=repair)
    if as_json:
        echo_json(report.as_dict())
    else:
        for line in report.repaired:
            typer.echo(f"repaired: {line}")
        for kind, counts in report.counts.items():
            typer.echo(f"{kind}s: {counts['catalog']} in the catalog, {counts['index']} in the index")
        for finding in report.findings:
            typer.echo(f"{finding.severity}: {finding.message}")
        if report.ok:
            typer.echo("ok" + (" (warnings above)" if report.findings else ""))
        elif not repair:
            typer.echo("run `mmsearch check --repair` to rebuild the indexes from the catalog")
    if not report.ok:
        raise typer.Exit(1)


@app.command()
@handle_errors
def train(
    ctx: typer.Context,
    pairs: Path = typer.Argument(..., metavar="PAIRS", help="JSONL or CSV with 'image' (relative to the file) and 'text'."),
    out: Path = typer.Option(..., "--out", "-o", metavar="DIR", help="Model folder to write (usable as --model DIR)."),
    base: str = typer.Option(
        "small", "--base", metavar="SPEC",
        help="Start from this model spec, or 'small': the shipped small architecture, trained from scratch.",
    ),
    epochs: int = typer.Option(30, "--epochs", metavar="N", help="Dual-encoder epochs."),
    rerank_epochs: int = typer.Option(2, "--rerank-epochs", metavar="N", help="Re-ranker epochs."),
    batch: int = typer.Option(128, "--train-batch", metavar="N", help="Pairs per contrastive batch."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (default 1e-3 from scratch, 1e-5 from a base)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the split, the order and the initialisation."),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="Share of texts held out for validation."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Train a dual encoder and a re-ranker on image–caption pairs; resumes an interrupted run."""
    from mmsearch.encode import resolve_device
    from mmsearch.modelspec import parse
    from mmsearch.runtime import cpu_count, prepare_model_access, set_torch_threads
    from mmsearch.train import TrainOptions, train as run_train

    settings = settings_of(ctx)
    if settings.int8:
        raise UsageError("--int8 is for index, search and eval; training runs in float32")
    set_torch_threads(cpu_count())
    if base != "small":
        prepare_model_access(parse(base))
    opts = TrainOptions(
        pairs=pairs, out=out, base=base, epochs=epochs, batch_size=batch, lr=lr, seed=seed,
        val_fraction=val_fraction, rerank_epochs=rerank_epochs, device=resolve_device(settings.device),
    )
    report = run_train(opts, progress=not quiet, say=warn)
    if as_json:
        echo_json(report.as_dict())
        return
    for name, val in (("dual encoder", report.val_dual), ("with re-ranker", report.val_rerank)):
        t2i, i2t = val["text_to_image"], val["image_to_text"]
        typer.echo(
            f"validation {name:15s} text→image R@1 {t2i['R@1']:.3f} R@5 {t2i['R@5']:.3f} R@10 {t2i['R@10']:.3f}"
            f" | image→text R@1 {i2t['R@1']:.3f} R@5 {i2t['R@5']:.3f} R@10 {i2t['R@10']:.3f}"
        )
    typer.echo(f"{report.message}; model written to {report.out} ({report.seconds:.0f} s)")


@app.command("eval")
@handle_errors
def evaluate(
    ctx: typer.Context,
    pairs: Path = typer.Argument(..., metavar="PAIRS", help="JSONL or CSV with 'image' (relative to the file) and 'text'."),
    model: Optional[str] = typer.Option(None, "--model", metavar="SPEC", help="Model to evaluate (overrides the global --model)."),
    rerank: bool = typer.Option(False, "--rerank", help="Re-score each query's best candidates with the re-ranker."),
    rerank_k: int = typer.Option(50, "--rerank-k", metavar="K", help="How many candidates --rerank re-scores."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Recall@1/5/10 of text→image and image→text retrieval on a pair file (temporary index)."""
    import dataclasses

    from mmsearch.evaluate import evaluate as run_eval
    from mmsearch.modelspec import parse
    from mmsearch.runtime import prepare_model_access

    settings = settings_of(ctx)
    if model is not None:
        settings = dataclasses.replace(settings, model=model)
    _threads_for_indexing(settings)
    prepare_model_access(parse(settings.model or DEFAULT_MODEL))
    result = run_eval(
        pairs, settings, rerank=rerank, rerank_k=rerank_k, progress=not quiet,
        on_skip=lambda path, reason: warn(f"skipped {show_path(path)}: {reason}"),
    )
    if as_json:
        echo_json(result)
        return
    typer.echo(f"{result['images']} images, {result['texts']} texts, rerank: {'yes' if rerank else 'no'}")
    for key, name in (("text_to_image", "text→image"), ("image_to_text", "image→text")):
        r = result[key]
        typer.echo(f"{name}  R@1 {r['R@1']:.3f}  R@5 {r['R@5']:.3f}  R@10 {r['R@10']:.3f}")


def _threads_for_indexing(settings: Settings) -> None:
    """Process set-up for a command that indexes: idle threads sleep, each CPU lane gets its cores."""
    from mmsearch.runtime import share_cores_with_decoding, threads_for_lanes

    share_cores_with_decoding()  # before torch loads
    from mmsearch.encode import resolve_device
    from mmsearch.indexer import cpu_lanes

    lanes = cpu_lanes(settings.workers)
    if lanes and resolve_device(settings.device) == "cpu":
        threads_for_lanes(lanes)


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def main() -> None:
    app()


if __name__ == "__main__":
    main()
