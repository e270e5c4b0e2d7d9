"""The ``mmsearch`` command: thin Typer commands over the library.

Results go to stdout (``--json``: one JSON object per line); progress, skipped
files and errors go to stderr. Every expected failure is one ``error:`` line
and a non-zero exit.
"""

from __future__ import annotations

import functools
import json
import os
import re
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
            typer.echo(f"error: {one_line(str(exc))}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted; what was finished is kept", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


#: Control characters (C0, DEL, C1) and Unicode line/paragraph separators: each would
#: break a line or drive the terminal (ESC) if printed as is.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def one_line(text: str) -> str:
    """``text`` with control characters escaped (``\\n``, ``\\t``, ``\\x1b``), so it prints as one line.

    For plain output only; ``--json`` output keeps every character exact.
    """
    return _CONTROL.sub(_escape, text)


def show_path(path: str) -> str:
    """A path printable on any terminal as one line (undecodable bytes and control characters as escapes)."""
    return one_line(os.fsencode(path).decode("utf-8", "backslashreplace"))


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
    catalog: Optional[str] = typer.Option(
        None, "--catalog", metavar="URL",
        help=(
            "Keep the catalog in a PostgreSQL database (postgresql+psycopg://USER@HOST/DB; needs the [postgres] "
            "extra), shared by the homes of several machines; the home keeps only its index cache, locks and "
            "thumbnails. Env: MMSEARCH_CATALOG. Default: the home's own SQLite file."
        ),
    ),
    text_precision: Optional[str] = typer.Option(
        None, "--text-precision", metavar="P",
        help=(
            "How texts (queries and corpora) are encoded: auto, float32 or bfloat16. auto: bfloat16 on a CPU with "
            "native bfloat16 (AMX / AVX-512 BF16; ~2x faster text queries, cosine >= 0.9999 to float32), "
            "float32 elsewhere. Env: MMSEARCH_TEXT_PRECISION."
        ),
    ),
    version: bool = typer.Option(
        False, "--version", callback=version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Search your images and texts by meaning."""
    from mmsearch.runtime import quiet_library_warnings, route_logging

    route_logging()
    quiet_library_warnings()
    ctx.obj = resolve(
        home=home, model=model, device=device, batch_size=batch_size, workers=workers, int8=int8 or None,
        catalog=catalog,
        text_precision=text_precision,
    )


@app.command()
@handle_errors
def index(
    ctx: typer.Context,
    paths: list[Path] = typer.Argument(..., metavar="PATH...", help="Folders (searched recursively) or image files."),
    as_json: bool = typer.Option(False, "--json", help="Print the counts as one JSON object on the last line."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    strict: bool = typer.Option(False, "--strict", help="Exit non-zero (3) if any file was skipped."),
    max_file_size: Optional[str] = typer.Option(
        None, "--max-file-size", metavar="SIZE",
        help="Skip image files larger than this (200MB, 1G, 1.5GiB...). Env: MMSEARCH_MAX_FILE_SIZE. Default: 200MB.",
    ),
    ray: Optional[str] = typer.Option(
        None, "--ray", metavar="[ADDRESS]",
        help="Decode and encode on a Ray cluster (pip install 'mmsearch\\[ray]'): ADDRESS, else RAY_ADDRESS, "
             "else a local cluster for this run. The folders must be at the same path on every node.",
    ),
) -> None:
    """Embed every image under PATH...; unchanged files are not read again."""
    import contextlib
    import dataclasses

    from mmsearch.home import Home
    from mmsearch.indexer import index_paths, unsupported_notes
    from mmsearch.runtime import prepare_model_access, share_cores_with_decoding, threads_for_lanes
    from mmsearch.settings import parse_size

    settings = settings_of(ctx)
    if max_file_size is not None:
        settings = dataclasses.replace(settings, max_file_size=parse_size(max_file_size, "--max-file-size"))
    share_cores_with_decoding()  # before torch loads (an unchanged folder never loads it)
    with contextlib.ExitStack() as stack:
        if ray is not None:
            from mmsearch.raypipe import connected

            stack.enter_context(connected(ray or None))
        home = stack.enter_context(Home.open(settings))
        home.before_model_load = prepare_model_access
        report = index_paths(
            home, paths, progress=not quiet, on_lanes=threads_for_lanes, ray=ray is not None,
            on_skip=lambda path, reason: warn(f"skipped {show_path(path)}: {one_line(reason)}"),
        )
    for note in unsupported_notes(report):
        warn(note)
    if as_json:
        echo_json(report.as_dict())
    else:
        typer.echo(
            f"added {report.added}, updated {report.updated}, unchanged {report.unchanged}, "
            f"removed {report.removed}, skipped {report.skipped}, ignored {report.ignored} ({report.seconds:.1f} s)"
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
def reindex(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print the counts as one JSON object on the last line."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    drop_unreadable: bool = typer.Option(
        False, "--drop-unreadable",
        help="Remove indexed images that cannot be read now (permissions, I/O errors, a folder not there) "
        "instead of stopping before the switch.",
    ),
) -> None:
    """Re-embed everything with --model SPEC and switch the home to it; search uses the old model until it is done."""
    from mmsearch.reindex import reindex as run_reindex
    from mmsearch.runtime import prepare_model_access, share_cores_with_decoding, threads_for_lanes

    share_cores_with_decoding()  # before torch loads
    report = run_reindex(
        settings_of(ctx), progress=not quiet, on_lanes=threads_for_lanes, before_model_load=prepare_model_access,
        on_skip=lambda path, reason: warn(f"skipped {show_path(path)}: {one_line(reason)}"),
        drop_unreadable=drop_unreadable,
    )
    if as_json:
        echo_json(report.as_dict())
    elif not report.switched:
        typer.echo(f"{settings_of(ctx).home} already uses model {report.previous_model}; nothing to do")
    else:
        typer.echo(
            f"switched to {report.model}: re-embedded {report.images} images and {report.texts} texts, "
            f"{report.resumed} kept from an interrupted run, removed {report.removed}, "
            f"skipped {report.skipped} ({report.seconds:.1f} s)"
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
        False, "--rerank",
        help="Re-score the best candidates with the model's cross-attention re-ranker (a CoCa model's own decoder).",
    ),
    rerank_k: int = typer.Option(50, "--rerank-k", metavar="K", help="How many candidates --rerank re-scores."),
    cutoff: Optional[str] = typer.Option(
        None, "--cutoff", metavar="auto|NUMBER",
        help="Leave out results whose relevance (calibrated, comparable across models) is below this; auto: the default threshold.",
    ),
    preview: bool = typer.Option(
        False, "--preview",
        help="Show a small thumbnail beside each image result in terminals that draw inline images "
        "(kitty, Ghostty, iTerm2, WezTerm); elsewhere one line says so.",
    ),
) -> None:
    """Find images (or with --texts, texts) by a text query and/or an example image."""
    from mmsearch.relevance import parse_cutoff

    try:
        threshold = parse_cutoff(cutoff)
    except UsageError as exc:
        raise UsageError(f"--{exc}") from None
    if rerank and rerank_k < 1:
        raise typer.BadParameter(f"must be at least 1, got {rerank_k}", param_hint="--rerank-k")
    if top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {top_k}")
    if query is None and image is None:
        raise UsageError("nothing to search for: give a QUERY, or --image FILE")
    if rerank and not texts and image is not None:
        raise UsageError("--rerank for images needs a text query (not --image)")
    if rerank and texts and (image is None or query):
        raise UsageError("--rerank for texts needs --image FILE alone (no text query)")
    settings = settings_of(ctx)
    protocol = _preview_protocol(as_json, texts) if preview else None

    def show(rows: list[dict[str, Any]]) -> None:
        drawn = {}
        if protocol is not None:
            from mmsearch.preview import previews

            drawn = previews(settings, [(row["id"], row["path"]) for row in rows if "path" in row], protocol)
        _print_hits(rows, as_json, drawn)

    if image is None and query is not None and (not rerank or rerank_k == DEFAULT_RERANK_K):
        params = {"q": query, "k": top_k, "texts": int(texts), "rerank": int(rerank), "raw": 1}
        if threshold is not None:
            params["cutoff"] = repr(threshold)
        answer = _from_server(settings, "/api/search", params, names_no_file=query)
        if answer is not None:
            for message in answer.get("warnings", ()):
                warn(one_line(message))
            if not answer["results"] and threshold is not None:
                typer.echo("no good match", err=True)
                return
            show(answer["results"])
            return
    from mmsearch.library import Library
    from mmsearch.runtime import prepare_model_access, set_torch_threads
    from mmsearch.query import parse_query

    text_only = image is None and bool(query) and all(term.image is None for term in parse_query(query or ""))

    def before_model_load(spec: Any) -> None:
        if text_only:
            # a short text runs on one CPU thread: ~150 tiny ops that would each wait for
            # every thread of a team to be scheduled (bench/text_encode.py)
            set_torch_threads(1)
        prepare_model_access(spec)

    with Library.open(settings, create=False, before_model_load=before_model_load) as library:
        hits = library.search(
            query, image=image, target="text" if texts else "image", k=top_k,
            rerank_k=rerank_k if rerank else 0, on_warning=lambda message: warn(one_line(message)), cutoff=threshold,
        )
    if not hits and threshold is not None:
        typer.echo("no good match", err=True)
        return
    show([{**hit.as_dict(), "score_raw": float(hit.score)} for hit in hits])


def _preview_protocol(as_json: bool, texts: bool) -> str | None:
    """The inline-image protocol of the terminal ``--preview`` draws in, or None (said in one line)."""
    from mmsearch.preview import detect, unsupported

    if as_json:
        warn("--preview: no thumbnails with --json (its output stays one JSON object per line)")
        return None
    if texts:
        warn("--preview: text results have no thumbnails")
        return None
    protocol = detect(os.environ)
    if protocol is None:
        warn(unsupported(os.environ))
    return protocol


#: What ``--rerank`` re-scores unless ``--rerank-k`` says otherwise (the server's only choice).
DEFAULT_RERANK_K = 50


def _from_server(settings: Settings, path: str, params: dict[str, Any] | None = None, names_no_file: str = "") -> Any:
    """The answer of a running ``mmsearch serve`` on this home, or ``None`` to work in-process.

    Used only when the server would do exactly what this process would: same
    model, int8 and text precision, and no query term that might name an image file
    (the server never opens paths). Any failure falls back silently.
    """
    from mmsearch.client import get_json, read_record
    from mmsearch.discover import IMAGE_EXTENSIONS

    lowered = names_no_file.lower()
    if any(ext in lowered for ext in IMAGE_EXTENSIONS):
        return None
    record = read_record(settings.home)
    if record is None or record.int8 != settings.int8 or record.text_precision != settings.text_precision:
        return None
    if settings.model is not None:
        from mmsearch import modelspec

        try:
            if modelspec.parse(settings.model).canonical != record.model:
                return None
        except MmsearchError:
            return None
    answer = get_json(record, path, params)
    if answer is None or answer[0] != 200 or not isinstance(answer[1], dict):
        return None
    return answer[1]


def _print_hits(rows: list[dict[str, Any]], as_json: bool, previews: dict[int, str] | None = None) -> None:
    """Print search results, from this process or a server's answer, one way.

    Each row is a hit's JSON plus ``score_raw``, its unrounded score, which
    the plain output shows to three places. ``previews`` holds the escape
    sequences that draw an image result's thumbnail before its line.
    """
    for row in rows:
        row.pop("thumb", None)
    if as_json:
        for row in rows:
            row.pop("score_raw", None)
            echo_json(row)
        return
    if not rows:
        typer.echo("no results", err=True)
        return
    for row in rows:
        is_image = "path" in row
        shown = show_path(row["path"]) if is_image else one_line(row.get("text") or "")
        label = "" if is_image else f"[{row['id']}] "
        drawn = (previews or {}).get(row["id"], "") if is_image else ""
        typer.echo(f"{drawn}{row['rank']:>3}  {row['score_raw']:6.3f}  {label}{shown}")


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
    info = _from_server(settings_of(ctx), "/api/status")
    if info is None:
        from mmsearch.home import status as home_status

        info = home_status(settings_of(ctx))
    if as_json:
        echo_json(info)
        return
    catalog = f"catalog: {info.get('catalog_backend', 'sqlite')} {info.get('catalog_url', '')}".rstrip()
    if not info["exists"]:
        typer.echo(f"home: {info['home']} (empty: nothing indexed yet)")
        typer.echo(catalog)
        return
    typer.echo(f"home:    {info['home']}")
    typer.echo(catalog)
    typer.echo(f"model:   {info['model'] or '(none yet)'}" + (f"  ({info['dim']}-d)" if info["dim"] else ""))
    typer.echo(f"images:  {info['images']}")
    typer.echo(f"texts:   {info['texts']}")
    if info.get("reindex"):
        typer.echo(
            f"reindex: to {info['reindex']['model']}, {info['reindex']['staged']} items done "
            "(unfinished: run `mmsearch --model SPEC reindex` again to go on)"
        )
    typer.echo(f"on disk: {_size(int(info['disk_bytes']))}")


@app.command()
@handle_errors
def serve(
    ctx: typer.Context,
    host: str = typer.Option(
        "127.0.0.1", "--host", metavar="ADDR",
        help="Address to listen on. Anything but a loopback address needs a token (one is made if --token is not given).",
    ),
    port: int = typer.Option(8765, "--port", metavar="PORT", help="Port to listen on (0: any free port)."),
    token: Optional[str] = typer.Option(
        None, "--token", metavar="TOKEN",
        help="Require this token on every API call (Authorization: Bearer TOKEN, or the cookie the page link sets).",
    ),
    open_browser: bool = typer.Option(False, "--open", help="Open the web app in a browser once it is ready."),
) -> None:
    """Serve this home: an HTTP API and a web app with thumbnails; `search` and `status` use it while it runs."""
    import secrets

    from mmsearch.library import Library
    from mmsearch.server import is_loopback, run

    if token is not None and not token.strip():
        raise UsageError("--token must not be empty")
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, got {port}")
    if token is None and not is_loopback(host):
        token = secrets.token_urlsafe(24)
        warn(f"{host} is not a loopback address: every API call needs the token {token}")
    from mmsearch.runtime import prepare_model_access, set_torch_threads

    # Each request runs the model on one thread: a short text query is ~150 tiny
    # ops that would each wait for a whole thread team (bench/text_encode.py),
    # and concurrent requests then use the cores side by side (bench/serve.py).
    set_torch_threads(1)
    with Library.open(settings_of(ctx), create=False, before_model_load=prepare_model_access) as library:
        run(library, host=host, port=port, token=token, say=typer.echo, open_browser=open_browser)


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
    epochs: Optional[int] = typer.Option(
        None, "--epochs", metavar="N",
        help="Dual-encoder epochs; default 35 from scratch, 30 with --base "
             "(0 with --base: keep its encoder, fit only the re-ranker and exemplar memory, or a CoCa's fusion).",
    ),
    augment: Optional[str] = typer.Option(
        None, "--augment", metavar="KIND",
        help="Image augmentation: style (zoom, shift and a random drawing style: outlines, shading, flat fills, "
             "saturation; the default from scratch) or shift (zoom and shift only; the default with --base).",
    ),
    rerank_epochs: int = typer.Option(2, "--rerank-epochs", metavar="N", help="Re-ranker epochs."),
    batch: Optional[int] = typer.Option(
        None, "--train-batch", metavar="N", help="Pairs per contrastive batch (default 256 from scratch on 2,048 training pairs or more, else 128).",
    ),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (default from scratch 1.4e-3 in batches of 256 or more, else 1e-3; 1e-5 from a base)."),
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
        pairs=pairs, out=out, base=base, epochs=epochs, augment=augment, batch_size=batch, lr=lr, seed=seed,
        val_fraction=val_fraction, rerank_epochs=rerank_epochs, device=resolve_device(settings.device),
    )
    report = run_train(opts, progress=not quiet, say=warn)
    if as_json:
        echo_json(report.as_dict())
        return
    rows = [("dual encoder", report.val_dual), ("with re-ranker", report.val_rerank)]
    if any(w > 0 for w in report.exemplar_weights.values()):
        rows.append(("as saved", report.val_saved))  # the re-ranker's kept directions plus the exemplar memory
    for name, val in rows:
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
        on_skip=lambda path, reason: warn(f"skipped {show_path(path)}: {one_line(reason)}"),
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


#: What a Ray cluster address looks like, so ``--ray`` can tell one from an indexed folder.
_RAY_ADDRESS = re.compile(r"^(auto|local|[a-z][a-z0-9+.-]*://.*|[\w.-]+:\d+)$", re.IGNORECASE)


def optional_values(argv: list[str]) -> list[str]:
    """``--ray`` takes an optional ADDRESS: a bare ``--ray`` becomes ``--ray=`` (Typer has no optional values).

    The next word is taken as the address only when it looks like one
    (``auto``, ``host:port``, ``ray://host:port``), so ``index --ray PHOTOS`` indexes PHOTOS.
    """
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--ray" and not (i + 1 < len(argv) and _RAY_ADDRESS.match(argv[i + 1])):
            arg = "--ray="
        out.append(arg)
    return out


def main() -> None:
    app(args=optional_values(sys.argv[1:]))


if __name__ == "__main__":
    main()
