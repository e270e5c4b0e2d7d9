"""The indexing pipeline: discover → decode → encode → store → index, wired in one place.

Incremental: a file whose (path, size, mtime) the catalog already holds is
not read again; a new file whose content hash the catalog knows (a rename or
a copy) reuses the stored vector; catalogued files that vanished from the
indexed folders are removed. The catalog is written batch by batch, so an
interrupted run keeps what it finished; the FAISS index is saved at the end
and rebuilt from the catalog if a run died before that.

On the CPU, files go through ``workers`` lanes: each lane reads, decodes and
encodes a whole batch on its own share of the cores, so decoding never stalls
the model's threads (0.69-0.71 → 0.75-0.80 of the model-only rate on 2 cores,
bench/index_throughput.py). On a GPU, decode threads feed the model in this
thread. Either way results are written in walk order.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmsearch.decode import Decoded, Skipped, decode_file, decode_many, enable_heif
from mmsearch.discover import FileEntry, check_roots, walk
from mmsearch.home import Home
from mmsearch.schema import ImageState
from mmsearch.store import under_any

SkipHandler = Callable[[str, str], None]


def cpu_lanes(workers: int) -> int:
    """How many lanes index on the CPU for ``workers``: never more than the cores.

    Each lane runs torch with the process's thread count; a front end gives
    each its share of the cores first (:func:`mmsearch.runtime.threads_for_lanes`).
    """
    from mmsearch.runtime import cpu_count

    return max(0, min(workers, cpu_count()))


@dataclass
class IndexReport:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    skipped: int = 0
    reused: int = 0
    seconds: float = 0.0
    #: files left alone for their name: not an image extension (``.svg``, ``.txt``...)
    ignored: int = 0
    skipped_files: list[tuple[str, str]] = field(default_factory=list)
    #: the ignored files counted by extension (lower case, ``""`` for none)
    ignored_extensions: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("skipped_files")
        out["seconds"] = round(self.seconds, 3)
        return out

    def ignore(self, path: str) -> None:
        self.ignored += 1
        ext = os.path.splitext(path)[1].lower()
        self.ignored_extensions[ext] = self.ignored_extensions.get(ext, 0) + 1


#: Extensions of pictures this tool cannot read, with what to tell the user about them.
UNSUPPORTED = {
    ".svg": "SVG (vector) images are not supported; export them as PNG to index them",
    ".svgz": "compressed SVG (vector) images are not supported; export them as PNG to index them",
}


def unsupported_notes(report: IndexReport) -> list[str]:
    """One line per kind of picture that was ignored because it cannot be read (``.svg``)."""
    return [
        f"ignored {report.ignored_extensions[ext]} {ext} file(s): {why}"
        for ext, why in UNSUPPORTED.items()
        if report.ignored_extensions.get(ext)
    ]


@dataclass(slots=True)
class _Ready:
    """A file with its vector, waiting to be written."""

    entry: FileEntry
    content_hash: str
    width: int
    height: int
    vector: np.ndarray | None  # the values the catalog stores (Catalog.stored); None: reuse the hash's


class _Writer:
    """Writes finished files to the catalog and the in-memory FAISS index in batches."""

    def __init__(
        self, home: Home, states: dict[str, ImageState], ids_by_hash: dict[str, int], report: IndexReport, batch: int
    ):
        self.home = home
        self.states = states
        #: content hash -> id of a row that holds it (-1: encoded, not yet written), kept current as rows are written
        self.ids_by_hash = ids_by_hash
        self.report = report
        self.batch = batch
        self.pending: list[_Ready] = []
        #: files sent to reuse a vector that was overwritten before they were written; they are encoded after all
        self.orphans: list[FileEntry] = []
        self.index = None
        #: the run took the collection past what its index type suits (mmsearch.index.fits):
        #: the index is no longer kept up to date in memory, and is built from the catalog at the end
        self.outgrown = False

    def put(self, item: _Ready) -> None:
        self.pending.append(item)
        if len(self.pending) >= self.batch:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        items, self.pending = self.pending, []
        catalog = self.home.catalog
        index = self.get_index()  # before writing: a rebuild must not see this batch
        # A reused vector's twin is in this batch or, flushed earlier, in the catalog.
        twins = {it.content_hash: (it.vector, it.width, it.height) for it in items if it.vector is not None}
        missing = {it.content_hash for it in items if it.vector is None and it.content_hash not in twins}
        if missing:
            ids = {h: self.ids_by_hash[h] for h in missing if self.ids_by_hash.get(h, -1) >= 0}
            twins.update(catalog.vectors_by_hash(ids))
        new_rows, changed_rows, vectors_new, vectors_changed, changed_ids = [], [], [], [], []
        for it in items:
            if it.vector is None:
                twin = twins.get(it.content_hash)
                if twin is None:  # its twin was changed in this run: encode it after all
                    self.orphans.append(it.entry)
                    continue
                vector, width, height = twin
                self.report.reused += 1
            else:
                vector, width, height = it.vector, it.width, it.height
            row = {
                "path": it.entry.path,
                "size": it.entry.size,
                "mtime_ns": it.entry.mtime_ns,
                "content_hash": it.content_hash,
                "width": width,
                "height": height,
                "vector": vector,
            }
            state = self.states.get(it.entry.path)
            if state is None:
                new_rows.append(row)
                vectors_new.append(vector)
            else:
                changed_rows.append({"id": state.id, **row})
                changed_ids.append(state.id)
                vectors_changed.append(vector)
        new_ids = catalog.write_images(new_rows, changed_rows)
        self.report.added += len(new_ids)
        self.report.updated += len(changed_rows)
        if changed_ids:
            index.remove(np.array(changed_ids, dtype=np.int64))
            index.add(np.array(changed_ids, dtype=np.int64), np.stack(vectors_changed))
        if new_ids:
            index.add(np.array(new_ids, dtype=np.int64), np.stack(vectors_new))
        for row, new_id in zip(new_rows, new_ids):
            self.states[row["path"]] = ImageState(new_id, row["size"], row["mtime_ns"], row["content_hash"])
            self.ids_by_hash[row["content_hash"]] = new_id
        for row in changed_rows:
            old = self.states[row["path"]]
            if self.ids_by_hash.get(old.content_hash) == old.id:  # that content is gone from the catalog
                del self.ids_by_hash[old.content_hash]
            self.states[row["path"]] = ImageState(old.id, row["size"], row["mtime_ns"], row["content_hash"])
            self.ids_by_hash[row["content_hash"]] = old.id
        if not self.outgrown and not isinstance(index, _NoIndex):
            from mmsearch.index import fits

            if not fits(index, index.count):
                self.index, self.outgrown = None, True

    def get_index(self):
        if self.outgrown:
            return _NoIndex()
        if self.index is None:
            self.index = self.home.index("image")
        return self.index

    def final_index(self):
        """The index to save: the one kept in memory, or one built from the catalog if the run outgrew it."""
        if not self.outgrown:
            return self.get_index()
        from mmsearch.index import build_from_catalog

        home = self.home
        return build_from_catalog(home.catalog, "image", home.dim, home.model_label, home.settings.index_path("image"))


class _NoIndex:
    """Stands in for an index the run has outgrown: changes go to the catalog only."""

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        pass

    def remove(self, ids: np.ndarray) -> int:
        return 0


def plan(
    entries: Sequence[FileEntry], states: dict[str, ImageState], unlisted: Sequence[str]
) -> tuple[list[FileEntry], int, list[int]]:
    """Split discovered files into (to read, unchanged count, catalogued ids that vanished).

    Files under folders that could not be listed (``unlisted``) are not
    counted as vanished: they may well still be there.
    """
    todo: list[FileEntry] = []
    unchanged = 0
    seen = set()
    in_unlisted = under_any(unlisted)
    for entry in entries:
        seen.add(entry.path)
        state = states.get(entry.path)
        if state is not None and state.size == entry.size and state.mtime_ns == entry.mtime_ns:
            unchanged += 1
        else:
            todo.append(entry)
    vanished = [
        state.id
        for path, state in states.items()
        if path not in seen and not in_unlisted(path)
    ]
    return todo, unchanged, vanished


def index_paths(
    home: Home,
    roots: Sequence[str | Path],
    *,
    progress: bool | Callable[[int, int], None] = True,
    on_skip: SkipHandler | None = None,
    on_lanes: Callable[[int], None] | None = None,
    ray: bool = False,
) -> IndexReport:
    """Index every image under ``roots`` into ``home``; see the module docstring.

    ``ray``: decode and encode on the Ray cluster this process is connected to
    (:func:`mmsearch.raypipe.connected`); planning and writing stay here.

    ``progress``: a bar on stderr (``True``), none, or ``progress(done, total)`` called per batch.
    ``on_lanes(n)`` is called once, before ``n`` CPU lanes start encoding (not
    when nothing needs encoding): the place for a front end to give each lane
    its share of the cores (:func:`mmsearch.runtime.threads_for_lanes`).
    """
    started = time.perf_counter()
    report = IndexReport()
    root_paths = check_roots(roots)
    enable_heif()

    def skip(path: str, reason: str) -> None:
        report.skipped += 1
        report.skipped_files.append((path, reason))
        if on_skip is not None:
            on_skip(path, reason)

    unlisted: list[str] = []

    def walk_error(path: str, reason: str) -> None:
        unlisted.append(path)
        skip(path, reason)

    with home.write_lock():
        if home.recorded_model is None:
            home.encoder()  # a new home: check the model now, not after the walk
        entries = list(walk(root_paths, on_error=walk_error, on_skip=skip, on_ignored=report.ignore))
        everything = home.catalog.image_states()  # one scan: the files under the roots, and every hash
        inside = under_any(root_paths)
        states = {p: s for p, s in everything.items() if inside(p)}
        todo, report.unchanged, vanished = plan(entries, states, unlisted)
        todo = _skip_known_bad(home, todo, root_paths, unlisted, skip)
        if not todo and not vanished:
            home.ensure_index_current("image")  # a killed run may have left it stale
            report.seconds = time.perf_counter() - started
            return report

        ids_by_hash = {s.content_hash: s.id for s in everything.values()}
        writer = _Writer(home, states, ids_by_hash, report, home.settings.batch_size)
        if todo:
            bad: list[Skipped] = []
            _encode_files(
                home, todo, writer, lambda s: bad.append(s) or skip(s.path, s.reason), progress, on_lanes, ray
            )
            _remember_bad(home, todo, bad)
        if vanished:
            index = writer.get_index()
            home.catalog.write_images([], [], removed_ids=vanished)
            index.remove(np.array(vanished, dtype=np.int64))
            report.removed = len(vanished)
        home.save_index(writer.final_index())
    report.seconds = time.perf_counter() - started
    return report


def _skip_known_bad(
    home: Home, todo: list[FileEntry], roots: Sequence[str], unlisted: Sequence[str], skip: SkipHandler
) -> list[FileEntry]:
    """``todo`` without the files that failed to decode before and have not changed since.

    Those are reported as skipped again without being read, so an unchanged
    folder with a broken file never loads the model. Remembered files that
    changed or vanished are forgotten (a changed one is read again).
    """
    remembered = home.catalog.skipped_files(roots)
    if not remembered:
        return todo
    keep, forget = [], []
    listed = {e.path for e in todo}
    in_unlisted = under_any(unlisted)
    for entry in todo:
        known = remembered.get(entry.path)
        if known is not None and known[:2] == (entry.size, entry.mtime_ns):
            skip(entry.path, f"{known[2]} (unchanged since; not read again)")
        else:
            keep.append(entry)
            if known is not None:
                forget.append(entry.path)
    for path in remembered:
        if path not in listed and not in_unlisted(path):
            forget.append(path)  # vanished, or now indexed fine
    home.catalog.write_skipped([], forget)
    return keep


def _remember_bad(home: Home, todo: list[FileEntry], bad: list["Skipped"]) -> None:
    """Remember files that failed to decode (not transient read errors) with their size and mtime."""
    entries = {e.path: e for e in todo}
    rows = [
        {"path": s.path, "size": entries[s.path].size, "mtime_ns": entries[s.path].mtime_ns, "reason": s.reason}
        for s in bad
        if not s.transient and s.path in entries
    ]
    home.catalog.write_skipped(rows, [])


#: One step of the encode loop: files in walk order (decoded, reusable or skipped)
#: and the vectors (plus re-ranker token states, or None) of those that were encoded.
_Step = tuple[list[Decoded | Skipped], np.ndarray | None, Any]
_Decode = Callable[[FileEntry], Decoded | Skipped]
_Encode = Callable[[list[Decoded]], tuple[np.ndarray | None, Any]]


def _encode_files(
    home: Home, todo: list[FileEntry], writer: _Writer, skip: Callable[["Skipped"], None],
    progress: bool | Callable[[int, int], None],
    on_lanes: Callable[[int], None] | None = None,
    ray: bool = False,
) -> None:
    from tqdm import tqdm

    from mmsearch.preprocess import split_preprocess
    from mmsearch.rerank import token_sink

    encoder = home.encoder()
    tokens = token_sink(home, encoder)  # None unless the model has a re-ranker
    known = writer.ids_by_hash
    reuse = known.__contains__
    settings = home.settings
    # decode threads stop at uint8 pixels; the batch becomes a tensor here (see mmsearch.preprocess)
    split = split_preprocess(encoder.preprocess)

    def decode(entry: FileEntry) -> Decoded | Skipped:
        return decode_file(entry, split.per_image, encoder.image_size, reuse, settings.max_file_size)

    def encode(decoded: list[Decoded]) -> tuple[np.ndarray | None, Any]:
        if not decoded:
            return None, None
        pixels = split.batch([d.pixels for d in decoded])
        if tokens is None:
            return encoder.embed_images(pixels), None
        return encoder.embed_images_with_tokens(pixels)

    def finish(step: _Step) -> None:
        results, vectors, states = step
        encoded = [r for r in results if isinstance(r, Decoded) and r.pixels is not None]
        if tokens is not None and encoded:
            tokens.add([d.content_hash for d in encoded], states)
        stored = iter(home.catalog.stored(vectors) if encoded else ())  # one conversion per batch
        for result in results:
            if isinstance(result, Skipped):
                skip(result)
            elif result.pixels is None:
                writer.put(_Ready(result.entry, result.content_hash, 0, 0, None))
            else:
                writer.put(_Ready(result.entry, result.content_hash, result.width, result.height, next(stored)))
                known.setdefault(result.content_hash, -1)  # its id comes when the writer writes it

    bar = tqdm(total=len(todo), unit="img", disable=progress is not True, file=sys.stderr, dynamic_ncols=True)
    on_progress = progress if callable(progress) else None
    done, total = 0, len(todo)
    try:
        lanes = cpu_lanes(settings.workers) if encoder.device == "cpu" and not ray else 0
        if lanes and on_lanes is not None:
            on_lanes(lanes)
        while todo:
            if ray:
                from mmsearch import raypipe

                steps = raypipe.steps(
                    todo, per_image=split.per_image, to_batch=split.batch, min_side=encoder.image_size,
                    known=frozenset(h for h in known if reuse(h)), max_bytes=settings.max_file_size,
                    spec=home.spec, device=settings.device, int8=settings.int8, batch_size=settings.batch_size,
                    tokens=(tokens.tokens, tokens.dim) if tokens is not None else None,
                )
            elif lanes:
                steps = _in_lanes(todo, decode, encode, lanes, settings.batch_size)
            else:
                steps = _streamed(todo, decode, encode, settings.workers, settings.batch_size)
            for step in steps:
                finish(step)
                bar.update(len(step[0]))
                done += len(step[0])
                if on_progress is not None:
                    on_progress(done, total)
            writer.flush()
            # Files whose vector was to be reused from a row this run then
            # changed: a second pass encodes them (and reuses nothing).
            todo, writer.orphans = writer.orphans, []
            reuse = _never
            bar.total += len(todo)
            total += len(todo)
    finally:
        bar.close()


def encode_steps(
    todo: list[FileEntry], decode: _Decode, encode: _Encode, *, lanes: int, workers: int, batch_size: int
) -> Iterator[_Step]:
    """Read, decode and encode ``todo`` as ``index`` does (CPU lanes, or decode threads feeding a GPU).

    Yields ``(results, vectors, token states)`` per batch in walk order, for
    another pipeline over catalogued files (``reindex``); ``lanes`` is
    :func:`cpu_lanes` on the CPU, 0 on a GPU.
    """
    if lanes:
        return _in_lanes(todo, decode, encode, lanes, batch_size)
    return _streamed(todo, decode, encode, workers, batch_size)


def _never(_content_hash: str) -> bool:
    return False


def _in_lanes(todo: list[FileEntry], decode: _Decode, encode: _Encode, lanes: int, batch_size: int) -> Iterator[_Step]:
    """CPU: ``lanes`` threads each read, decode and encode a whole batch in turn; steps in walk order.

    A lane runs the model on its own share of the cores (see
    :func:`cpu_lanes`), so no decoder ever pre-empts a
    thread that an op of the model is waiting for, and a core that finishes
    its decoding goes straight on to encoding.
    """

    def lane(chunk: list[FileEntry]) -> _Step:
        results = [decode(entry) for entry in chunk]
        vectors, states = encode([r for r in results if isinstance(r, Decoded) and r.pixels is not None])
        return results, vectors, states

    chunks = (todo[i:i + batch_size] for i in range(0, len(todo), batch_size))
    yield from decode_many(chunks, lane, lanes, window=2 * lanes)


def _streamed(todo: list[FileEntry], decode: _Decode, encode: _Encode, workers: int, batch_size: int) -> Iterator[_Step]:
    """GPU (or ``workers=0``): ``workers`` threads decode ahead; this thread encodes each full batch."""
    results: list[Decoded | Skipped] = []
    batch: list[Decoded] = []
    for result in decode_many(todo, decode, workers, window=max(2 * batch_size, 16)):
        results.append(result)
        if isinstance(result, Decoded) and result.pixels is not None:
            batch.append(result)
            if len(batch) >= batch_size:
                yield results, *encode(batch)
                results, batch = [], []
    if results:
        yield results, *encode(batch)
