"""Switch a home to another model without losing it: re-embed everything the catalog holds.

``mmsearch --model NEW reindex`` embeds every catalogued image again from
its file and every text from the catalog with the new model, into the
staging area of :mod:`mmsearch.staging`, a batch per transaction. The home
keeps answering with the old model meanwhile: its vectors, FAISS files and
re-ranker tokens are untouched. Once every item has its new vector, one
transaction moves them in and records the new model; then the FAISS
indexes are rebuilt for it and the old model's re-ranker tokens are
replaced by the new model's (made during the run) or dropped.

A run killed at any point leaves a home on the old model (or, past the
switch's commit, on the new one); the next run keeps what was staged and
goes on from there.

Files are treated as ``index`` treats them: one that was deleted (its
folder is there, it is not) is removed from the catalog; one that cannot be
decoded any more is removed and remembered as a bad file; one that cannot
be read now (permissions, an I/O error, a folder that is not there: a disk
not mounted?) stops the switch before it happens, unless the caller drops
such files too (``drop_unreadable``). A file that changed since it was
indexed is embedded as it is now, and its row is updated with it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmsearch import modelid, modelspec
from mmsearch.decode import Decoded, Skipped, decode_file, enable_heif
from mmsearch.discover import FileEntry
from mmsearch.errors import HomeWriteError, InputFileError, UsageError
from mmsearch.home import Home, write_failure
from mmsearch.schema import KINDS
from mmsearch.settings import Settings
from mmsearch.staging import Staging, iter_texts, text_source

if TYPE_CHECKING:
    from mmsearch.encode import Encoder

#: Texts read from the catalog, embedded and staged together (one transaction).
TEXT_CHUNK = 4096

#: A meta key set by the switch's transaction and removed once what follows it is done (:func:`finish_switch`).
FINISH_KEY = "reindex_finish"

#: How many unreadable files the error that stops a switch names.
EXAMPLES = 3


@dataclass
class ReindexReport:
    """What a ``reindex`` did (``--json`` prints :meth:`as_dict`)."""

    model: str = ""
    previous_model: str = ""
    #: images embedded with the new model in this run (copies of a picture count once)
    images: int = 0
    #: texts embedded with the new model in this run
    texts: int = 0
    #: images and texts whose new vector an earlier, interrupted run had already made
    resumed: int = 0
    #: images that are copies of another picture and took its vector
    reused: int = 0
    #: images dropped from the catalog: deleted files, and files that cannot be decoded any more
    removed: int = 0
    #: files that could not be decoded (removed) or read (removed only with ``drop_unreadable``)
    skipped: int = 0
    #: whether the home now uses the new model (False: it already did, nothing to do)
    switched: bool = False
    seconds: float = 0.0
    skipped_files: list[tuple[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("skipped_files")
        out["seconds"] = round(self.seconds, 3)
        return out


def staging_folder(home_dir: Path) -> Path:
    """Where a run keeps the files it makes for the new model (its re-ranker tokens) until the switch."""
    return home_dir / "reindex"


def reindex(
    settings: Settings,
    *,
    progress: bool | Callable[[int, int], None] = True,
    on_skip: Callable[[str, str], None] | None = None,
    on_lanes: Callable[[int], None] | None = None,
    before_model_load: Callable[[modelspec.ModelSpec], None] | None = None,
    drop_unreadable: bool = False,
) -> ReindexReport:
    """Re-embed the home of ``settings`` with ``settings.model`` and switch it to that model.

    ``progress``: a bar on stderr (``True``), none, or ``progress(done, total)``
    per batch. ``on_skip(path, reason)`` hears of each file that could not be
    used; ``on_lanes(n)`` is called before ``n`` CPU lanes start encoding
    images; ``before_model_load(spec)`` before the new model loads (see
    :func:`mmsearch.indexer.index_paths`).
    """
    started = time.perf_counter()
    if settings.model is None:
        raise UsageError("reindex needs the model to switch to: mmsearch --model SPEC reindex")
    target = modelspec.parse(settings.model)
    with Home.open(dataclasses.replace(settings, model=None), create=False) as home:
        report = ReindexReport(model=target.canonical, previous_model=home.recorded_model or "")
        with home.write_lock():
            finish_switch(home)  # a run killed after its switch was committed
            if home.recorded_model is None:
                raise UsageError(f"nothing is indexed in {settings.home} yet; run `mmsearch index` or `add-texts`")
            if home.uses_model(target):
                staging = Staging(home.catalog)
                if staging.target():  # a switch to another model was begun: the home stays on this one
                    staging.abandon()
                    shutil.rmtree(staging_folder(settings.home), ignore_errors=True)
                report.seconds = time.perf_counter() - started
                return report
            _Run(home, target, report, progress, on_skip, on_lanes, before_model_load, drop_unreadable).run()
    report.seconds = time.perf_counter() - started
    return report


class _Run:
    """One reindex run over an open home whose write lock is held."""

    def __init__(
        self, home: Home, target: modelspec.ModelSpec, report: ReindexReport,
        progress: bool | Callable[[int, int], None], on_skip: Callable[[str, str], None] | None,
        on_lanes: Callable[[int], None] | None, before_model_load: Callable[[modelspec.ModelSpec], None] | None,
        drop_unreadable: bool,
    ):
        self.home = home
        self.target = target
        self.report = report
        self.progress = progress
        self.on_skip = on_skip
        self.on_lanes = on_lanes
        self.before_model_load = before_model_load
        self.drop_unreadable = drop_unreadable
        self.staging = Staging(home.catalog)
        self.bar: Any = None
        self.done = 0
        self.total = 0
        #: text id -> source of its staged vector (see :func:`mmsearch.staging.text_source`)
        self.text_sources: dict[int, str] = {}
        #: content hash -> id of a row whose staged vector is of that content (copies are encoded once)
        self.known: dict[str, int] = {}
        #: ids of images an earlier run staged whose files are gone now
        self.deleted: list[int] = []

    def run(self) -> None:
        from tqdm import tqdm

        from mmsearch.encode import load_encoder

        home, settings = self.home, self.home.settings
        files = modelid.model_files(self.target)
        model_hash = modelid.fingerprint(self.target, files) if files is not None else None
        if self.before_model_load is not None:
            self.before_model_load(self.target)
        encoder = load_encoder(self.target, settings.device, int8=settings.int8)
        if not self.staging.begin(self.target.canonical, model_hash, encoder.dim):
            shutil.rmtree(staging_folder(settings.home), ignore_errors=True)  # tokens of an abandoned run
        texts = self._plan_texts()
        images = self._plan_images()
        self.total = texts + len(images)
        self.bar = tqdm(total=self.total, unit="item", disable=self.progress is not True, file=sys.stderr,
                        dynamic_ncols=True)
        try:
            self._stage_texts(encoder)
            removed = self._stage_images(encoder, images)
        finally:
            self.bar.close()
        meta: dict[str, str | None] = {
            "model": self.target.canonical, "dim": str(encoder.dim), "model_hash": model_hash,
            "model_stamp": modelid.stamp(files) if files is not None else None,
            FINISH_KEY: "1",
        }
        self.staging.switch(meta, removed)
        self.report.removed = len(removed)
        self.report.switched = True
        finish_switch(home)

    # -- texts ------------------------------------------------------------------

    def _plan_texts(self) -> int:
        """How many texts need a new vector (those not staged by an earlier run)."""
        self.text_sources = self.staging.sources("text")
        todo = 0
        for chunk in iter_texts(self.home.catalog, TEXT_CHUNK):
            todo += sum(self.text_sources.get(i) != text_source(t) for i, t in chunk)
        self.report.resumed += self.home.catalog.count("text") - todo
        return todo

    def _stage_texts(self, encoder: "Encoder") -> None:
        batch = self.home.settings.batch_size * 4
        for chunk in iter_texts(self.home.catalog, TEXT_CHUNK):
            todo = [(i, t, text_source(t)) for i, t in chunk]
            todo = [(i, t, s) for i, t, s in todo if self.text_sources.get(i) != s]
            if not todo:
                continue
            todo.sort(key=lambda row: len(row[1]))  # shortest first: each batch runs at its own length
            rows = []
            for start in range(0, len(todo), batch):
                part = todo[start:start + batch]
                vectors = encoder.embed_texts([t for _, t, _ in part])
                rows.extend({"id": i, "source": s, "vector": v} for (i, _, s), v in zip(part, vectors))
            self.staging.put("text", rows)
            self.report.texts += len(rows)
            self._advance(len(rows))

    # -- images -----------------------------------------------------------------

    def _plan_images(self) -> list[tuple[str, int]]:
        """``(path, id)`` of the images that need a new vector, in path order."""
        states = self.home.catalog.image_states()
        staged = self.staging.sources("image")
        todo = sorted((path, s.id) for path, s in states.items() if staged.get(s.id) != s.content_hash)
        self.report.resumed += len(states) - len(todo)
        for path, s in states.items():
            if staged.get(s.id) == s.content_hash:
                if _deleted(path):  # staged by an earlier run, deleted since
                    self.deleted.append(s.id)
                else:
                    self.known.setdefault(s.content_hash, s.id)
        return todo

    def _stage_images(self, encoder: "Encoder", todo: list[tuple[str, int]]) -> list[int]:
        """Stage the new vectors of ``todo``; the ids of the images to remove at the switch."""
        from mmsearch.indexer import cpu_lanes, encode_steps
        from mmsearch.preprocess import split_preprocess
        from mmsearch.rerank import token_sink

        home, settings = self.home, self.home.settings
        tokens = token_sink(home, encoder, staging_folder(settings.home))  # None unless NEW has a re-ranker
        removed: list[int] = list(self.deleted)
        unreadable: list[tuple[str, int, str]] = []
        if not todo:
            return removed
        enable_heif()
        ids = dict(todo)
        split = split_preprocess(encoder.preprocess)
        known = self.known

        def decode(entry: FileEntry) -> Decoded | Skipped:
            return decode_file(entry, split.per_image, encoder.image_size, known.__contains__, settings.max_file_size)

        def encode(decoded: list[Decoded]) -> tuple[np.ndarray | None, Any]:
            if not decoded:
                return None, None
            pixels = split.batch([d.pixels for d in decoded])
            if tokens is None:
                return encoder.embed_images(pixels), None
            return encoder.embed_images_with_tokens(pixels)

        lanes = cpu_lanes(settings.workers) if encoder.device == "cpu" else 0
        if lanes and self.on_lanes is not None:
            self.on_lanes(lanes)
        entries = [FileEntry(path, 0, 0) for path, _ in todo]  # size and mtime come from the read
        bad: list[dict[str, Any]] = []
        for results, vectors, states in encode_steps(
            entries, decode, encode, lanes=lanes, workers=settings.workers, batch_size=settings.batch_size
        ):
            encoded = [r for r in results if isinstance(r, Decoded) and r.pixels is not None]
            if tokens is not None and encoded:
                tokens.add([d.content_hash for d in encoded], states)  # before the vectors: see TokenStore
            fresh = iter(vectors if encoded else ())
            rows, copies = [], []
            batch_hashes: dict[str, dict[str, Any]] = {}
            for result in results:
                if isinstance(result, Skipped):
                    self._skipped(result, ids[result.path], removed, unreadable, bad)
                    continue
                entry = result.entry
                row = {"id": ids[entry.path], "source": result.content_hash, "size": entry.size,
                       "mtime_ns": entry.mtime_ns}
                if result.pixels is None:
                    copies.append(row)
                    continue
                row.update(vector=next(fresh), width=result.width, height=result.height)
                rows.append(row)
                batch_hashes.setdefault(result.content_hash, row)
                known.setdefault(result.content_hash, row["id"])
            if copies:
                rows.extend(self._copies(copies, batch_hashes, encoder.dim))
            self.staging.put("image", rows)
            for row in rows:
                known.setdefault(row["source"], row["id"])
            self.report.images += len(rows) - len(copies)
            self.report.reused += len(copies)
            self._advance(len(results))
        if bad:
            home.catalog.write_skipped(bad, [])
        if unreadable:
            if not self.drop_unreadable:
                shown = "; ".join(f"{_show(p)}: {why}" for p, _, why in unreadable[:EXAMPLES])
                more = ", ..." if len(unreadable) > EXAMPLES else ""
                raise InputFileError(
                    f"{len(unreadable)} indexed image(s) cannot be read now ({shown}{more}); the home still "
                    "uses its old model and keeps the new vectors made so far: make the files readable (a disk "
                    "not mounted?) and run reindex again, or pass --drop-unreadable to remove them"
                )
            removed.extend(i for _, i, _ in unreadable)
        return removed

    def _copies(
        self, copies: list[dict[str, Any]], batch_hashes: dict[str, dict[str, Any]], dim: int
    ) -> list[dict[str, Any]]:
        """Rows for pictures whose content another row holds: its vector, from this batch or the staging area."""
        wanted = {row["source"]: self.known[row["source"]] for row in copies if row["source"] not in batch_hashes}
        staged = self.staging.staged("image", list(set(wanted.values())), dim)
        out = []
        for row in copies:
            twin = batch_hashes.get(row["source"])
            if twin is not None:
                out.append({**row, "vector": twin["vector"], "width": twin["width"], "height": twin["height"]})
            else:
                vector, width, height = staged[wanted[row["source"]]]
                out.append({**row, "vector": vector, "width": width, "height": height})
        return out

    def _skipped(
        self, result: Skipped, image_id: int, removed: list[int], unreadable: list[tuple[str, int, str]],
        bad: list[dict[str, Any]],
    ) -> None:
        path = result.path
        if _deleted(path):
            removed.append(image_id)  # as `index` would: its folder is there, the file is not
            return
        self.report.skipped += 1
        self.report.skipped_files.append((path, result.reason))
        if self.on_skip is not None:
            self.on_skip(path, result.reason)
        if result.transient:
            unreadable.append((path, image_id, result.reason))
            return
        removed.append(image_id)  # it cannot be decoded any more: `index` would not index it
        try:
            st = os.stat(path)
            bad.append({"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "reason": result.reason})
        except OSError:
            pass

    def _advance(self, n: int) -> None:
        self.bar.update(n)
        self.done += n
        if callable(self.progress):
            self.progress(self.done, self.total)


def _deleted(path: str) -> bool:
    """Whether a file is gone from a folder that is still there (not a folder that is missing as a whole)."""
    return not os.path.lexists(path) and os.path.isdir(os.path.dirname(path))


def _show(path: str) -> str:
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def finish_switch(home: Home) -> None:
    """What follows a committed switch, done again by the next run if one was killed midway.

    Rebuilds each FAISS index whose sidecar names another model; puts the new
    model's re-ranker tokens in place of the old model's, or removes the old
    ones when the new model has none. The caller holds the write lock.
    """
    import json

    from mmsearch.index import build_from_catalog, sidecar_is_current

    # the meta table's dim, not home.dim: this home may have been opened on the old model
    recorded, raw_dim = home.recorded_model, home.catalog.get_meta("dim")
    if home.catalog.get_meta(FINISH_KEY) is None or recorded is None or raw_dim is None:
        return
    dim = int(raw_dim)
    home_dir = home.settings.home
    staged_tokens = staging_folder(home_dir) / "rerank"
    tokens = home_dir / "rerank"

    def header_model(folder: Path) -> str | None:
        try:
            return json.loads((folder / "tokens.json").read_text()).get("model")
        except (OSError, ValueError, AttributeError):
            return None

    if header_model(staged_tokens) == recorded:
        shutil.rmtree(tokens, ignore_errors=True)
        try:
            os.replace(staged_tokens, tokens)
        except OSError as exc:
            raise HomeWriteError(
                f"cannot move {staged_tokens} to {tokens}: {write_failure(exc)}; the home uses {recorded} "
                "already, and the next `mmsearch reindex` with it moves them"
            ) from None
    if tokens.exists() and header_model(tokens) != recorded:
        shutil.rmtree(tokens, ignore_errors=True)  # the old model's: no model here can use them
    shutil.rmtree(staging_folder(home_dir), ignore_errors=True)
    label = home.model_label if home.spec.canonical == recorded else recorded
    for kind in KINDS:
        path = home.settings.index_path(kind)
        if home.catalog.count(kind) and not sidecar_is_current(path, home.catalog.generation(kind), dim, label):
            home.save_index(build_from_catalog(home.catalog, kind, dim, label))
    Staging(home.catalog).finished(FINISH_KEY)
