"""Text corpora: read ``.txt``, ``.jsonl`` and ``.csv`` files and add their texts to a home.

Every text has a key. The ``id`` a JSONL/CSV record gives wins; any other
text is keyed by its corpus and its content, ``NAME#HASH``: the corpus's file
name and 16 hex digits of a BLAKE2b hash of its absolute path and the text.
So re-adding a file changes nothing, another file never replaces a text of
this one, and inserting a line moves no other key. A key stored with another
text (a 64-bit hash collision, or a corpus id spelt that way) makes the new
text fall back to 32 hex digits. Adding a text whose key is already stored
replaces it (and its vector, if the text changed). Within one file a key
that repeats (the same id, or the same text without one) keeps its last
occurrence; the others are counted as duplicates.

A corpus is streamed, never held whole: a first pass parses it (every bad
line is an error before anything is written) and finds the repeated keys
from a 16-byte digest a text (about 40 bytes a text at the peak, freed
before encoding starts), a second one looks up, encodes and commits
:data:`CHUNK` texts at a time, each chunk one catalog transaction, so a
killed run keeps what it committed and the next run skips those as
unchanged.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mmsearch.errors import InputFileError
from mmsearch.home import Home

SUFFIXES = (".txt", ".jsonl", ".csv")

#: Texts looked up, encoded and committed together, at the default batch size
#: (it scales with ``--batch-size``): one catalog transaction each.
CHUNK = 4096


@dataclass(frozen=True, slots=True)
class TextItem:
    key: str
    text: str
    meta: dict[str, Any] | None = None
    #: the key was made from the text (no id in the corpus): see :func:`text_key`
    derived: bool = False


@dataclass
class TextReport:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    skipped: int = 0
    duplicates: int = 0
    truncated: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["seconds"] = round(self.seconds, 3)
        return out


def text_key(source: str, text: str, *, long: bool = False) -> str:
    """The key of a text without an id of its own: ``NAME#HASH`` of its corpus's absolute path and the text.

    ``long`` gives 32 hex digits instead of 16, for a text whose short key is
    already taken by another text. Migration 0006 re-keys catalogs with the
    same rule; keep the two in step.
    """
    return _key_maker(source, long)(text)


def _key_maker(source: str, long: bool = False) -> Callable[[str], str]:
    """:func:`text_key` for one corpus, with its per-corpus part made once (it runs for every line)."""
    prefix = source.encode("utf-8", "surrogateescape") + b"\0"
    name = os.path.basename(source) + "#"
    size = 16 if long else 8
    blake2b = hashlib.blake2b
    return lambda text: name + blake2b(prefix + text.encode("utf-8", "surrogatepass"), digest_size=size).hexdigest()


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 file, line endings kept, a leading BOM dropped."""
    try:
        with open(path, "rb") as fh:
            offset = 0
            for number, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise InputFileError(
                        f"{path}:{number}: not valid UTF-8 (byte {offset + exc.start})"
                    ) from None
                if number == 1 and line.startswith("\ufeff"):
                    line = line[1:]
                offset += len(raw)
                yield number, line
    except OSError as exc:
        raise InputFileError(f"cannot read {path}: {exc.strerror or exc}") from None


def _check_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InputFileError(f"{path}: unsupported text corpus type {suffix or '(none)'}; use .txt, .jsonl or .csv")
    return suffix


def iter_corpus(path: Path, *, keys: bool = True) -> Iterator[TextItem | None]:
    """The texts of a corpus file in order, ``None`` for each empty line or text; bad lines raise InputFileError.

    Reads one line (one CSV record) at a time. Keys are given ids or
    :func:`text_key` of the file's absolute path; with ``keys=False`` the
    latter are left empty (a pass that only needs the texts).
    """
    path = Path(path)
    suffix = _check_suffix(path)
    key_of = _key_maker(str(path.resolve())) if keys else _no_key
    if suffix == ".txt":
        for _number, line in _lines(path):
            # str.splitlines breaks at \r, \x0b, \x1c, \u2028 ... too, as before streaming
            for part in line.splitlines() or [""]:
                text = part.strip()
                yield TextItem(key_of(text), text, derived=True) if text else None
    elif suffix == ".jsonl":
        for number, line in _lines(path):
            if not line.strip():
                yield None
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputFileError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            yield _record_item(record, path, number, key_of)
    else:
        reader = csv.DictReader(line for _number, line in _lines(path))
        try:
            if reader.fieldnames is None or "text" not in reader.fieldnames:
                raise InputFileError(f"{path}: a CSV corpus needs a 'text' column")
            for record in reader:
                yield _record_item(record, path, reader.line_num, key_of)
        except csv.Error as exc:
            raise InputFileError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from None


def _no_key(_text: str) -> str:
    return ""


def _record_item(record: Any, path: Path, number: int, key_of: Callable[[str], str]) -> TextItem | None:
    """The item of one JSONL/CSV record; ``None`` for an empty text."""
    if not isinstance(record, dict):
        raise InputFileError(f"{path}:{number}: expected a JSON object with a 'text' field")
    if "text" not in record:
        raise InputFileError(f"{path}:{number}: no 'text' field")
    text = record["text"]
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if not isinstance(text, str):
        raise InputFileError(f"{path}:{number}: 'text' must be a string")
    text = _encodable(text.strip(), path, number, "text")
    meta = {k: v for k, v in record.items() if k not in ("text", "id") and v not in (None, "")}
    if meta:
        _encodable(json.dumps(meta, ensure_ascii=False), path, number, "meta")
    raw_id = record.get("id")
    if raw_id in (None, ""):
        return TextItem(key_of(text), text, meta or None, derived=True)
    return TextItem(_encodable(str(raw_id), path, number, "id"), text, meta or None)


def _encodable(value: str, path: Path, number: int, field: str) -> str:
    """``value``, unless JSON's ``\\uD800``-style escapes left a lone surrogate that UTF-8 (and SQLite) cannot hold."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InputFileError(f"{path}:{number}: '{field}' holds an unpaired UTF-16 surrogate (a bad \\u escape)") from None
    return value


def _identity(item: TextItem) -> bytes:
    """16 bytes that tell two items of one file apart: the id, or the text when the key comes from it."""
    tagged = (b"t\0" + item.text.encode()) if item.derived else (b"i\0" + item.key.encode())
    return hashlib.blake2b(tagged, digest_size=16).digest()


@dataclass
class CorpusScan:
    """What the first pass over a corpus found."""

    #: texts (non-empty items), duplicates included
    count: int
    #: empty lines and texts
    empty: int
    #: positions (among the texts) of the earlier occurrences of a repeated key, sorted
    dropped: np.ndarray
    size: int
    mtime_ns: int


def scan_corpus(path: Path, progress: bool = False) -> CorpusScan:
    """Parse a whole corpus (raising on its first bad line) and find the keys that repeat.

    Holds a 16-byte digest a text while it runs (about 40 bytes a text at
    the sort), and afterwards only the positions of the duplicates.
    """
    from tqdm import tqdm

    try:
        stat = os.stat(path)
    except OSError as exc:
        raise InputFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    digests = bytearray()
    empty = 0
    # shown only once reading takes a while: a small corpus with a bad line gets just the error
    bar = tqdm(unit="text", desc="reading", disable=not progress, file=sys.stderr, dynamic_ncols=True, delay=2.0)
    try:
        for item in iter_corpus(path, keys=False):
            if item is None:
                empty += 1
                continue
            digests += _identity(item)
            if not len(digests) % (16 * 4096):
                bar.update(4096)
    finally:
        bar.close()
    pairs = np.frombuffer(digests, dtype="<u8").reshape(-1, 2)
    count = len(pairs)
    if count > 1:
        order = np.lexsort((pairs[:, 1], pairs[:, 0]))  # stable: equal keys stay in file order
        ordered = pairs[order]
        repeated = (ordered[1:] == ordered[:-1]).all(axis=1)  # the earlier of two equal neighbours
        dropped = np.sort(order[:-1][repeated])
    else:
        dropped = np.zeros(0, dtype=np.int64)
    return CorpusScan(count, empty, dropped.astype(np.int64), stat.st_size, stat.st_mtime_ns)


def read_corpus(path: Path) -> tuple[list[TextItem], int, int]:
    """``(items, empty lines skipped, duplicate keys dropped)`` of a small corpus, held in memory.

    The same reading and duplicate rule as :func:`add_texts`, for callers
    that want the texts themselves.
    """
    items: dict[str, TextItem] = {}
    empty = total = 0
    for item in iter_corpus(path):
        if item is None:
            empty += 1
            continue
        total += 1
        items.pop(item.key, None)
        items[item.key] = item
    return list(items.values()), empty, total - len(items)


def _unique_items(path: Path, scan: CorpusScan, report: TextReport) -> Iterator[TextItem]:
    """The corpus's texts, each key at its last occurrence; the others are counted in ``report``."""
    dropped = iter(scan.dropped.tolist())
    next_drop = next(dropped, -1)
    position = 0
    for item in iter_corpus(path):
        if item is None:
            continue
        if position == next_drop:
            report.duplicates += 1
            next_drop = next(dropped, -1)
        else:
            yield item
        position += 1
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise InputFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    if position != scan.count or (stat.st_size, stat.st_mtime_ns) != (scan.size, scan.mtime_ns):
        raise InputFileError(
            f"{path} changed while it was being added; what was added is kept, run add-texts again"
        )


def _chunks(items: Iterator[TextItem], size: int) -> Iterator[list[TextItem]]:
    chunk: list[TextItem] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _TextWriter:
    """Looks up, encodes and writes one chunk of texts at a time; keeps the FAISS index in step.

    The in-memory index is kept while it suits the collection
    (:func:`mmsearch.index.fits`); once it has outgrown its type (a flat
    index past the IVF threshold) it is dropped, and :meth:`finish` builds
    the right one from the catalog, so no run holds a flat index of a large
    corpus, nor leaves one for the next search to rebuild.
    """

    def __init__(self, home: Home, source: str, report: TextReport, batch: int):
        self.home = home
        self.source = source
        self.report = report
        self.batch = batch
        self.index = None
        self.outgrown = False
        self.wrote = False

    def put(self, chunk: list[TextItem]) -> int:
        """Add the chunk's new and changed texts; returns how many texts it held."""
        catalog = self.home.catalog
        stored = catalog.text_states([it.key for it in chunk])
        # a derived key that holds another text (stored, or a corpus id in this chunk) is a
        # hash collision: this text takes the long key
        taken = {it.key: it.text for it in chunk if not it.derived}
        for key, (_id, text) in stored.items():
            taken.setdefault(key, text)
        clashes = []
        for i, it in enumerate(chunk):
            if it.derived:
                if taken.setdefault(it.key, it.text) != it.text:
                    chunk[i] = TextItem(text_key(self.source, it.text, long=True), it.text, it.meta, derived=True)
                    clashes.append(chunk[i].key)
        if clashes:
            stored.update(catalog.text_states(clashes))
        todo = []
        for item in chunk:
            known = stored.get(item.key)
            if known is not None and known[1] == item.text:
                self.report.unchanged += 1
            else:
                todo.append(item)
        if todo:
            self._write(todo, stored)
        return len(chunk)

    def _write(self, todo: list[TextItem], stored: dict[str, tuple[int, str]]) -> None:
        home, catalog = self.home, self.home.catalog
        encoder = home.encoder()
        # shortest first: each batch runs at its own real token length
        todo.sort(key=lambda it: len(it.text))
        new, changed, new_vecs, changed_vecs, changed_ids = [], [], [], [], []
        for start in range(0, len(todo), self.batch):
            part = todo[start:start + self.batch]
            vectors = catalog.stored(self._embed(encoder, [it.text for it in part]))
            for item, vector in zip(part, vectors):
                row = {
                    "key": item.key,
                    "text": item.text,
                    "source": self.source,
                    "meta": json.dumps(item.meta, ensure_ascii=False) if item.meta else None,
                    "vector": vector,
                }
                known = stored.get(item.key)
                if known is not None:
                    changed.append({"id": known[0], **row})
                    changed_ids.append(known[0])
                    changed_vecs.append(vector)
                else:
                    new.append(row)
                    new_vecs.append(vector)
        index = self._index()
        new_ids = catalog.write_texts(new, changed)
        self.wrote = True
        if index is not None:
            if changed_ids:
                ids = np.array(changed_ids, dtype=np.int64)
                index.remove(ids)
                index.add(ids, np.stack(changed_vecs))
            if new_ids:
                index.add(np.array(new_ids, dtype=np.int64), np.stack(new_vecs))
            self._check_fit()
        self.report.added += len(new_ids)
        self.report.updated += len(changed_ids)

    def _embed(self, encoder: Any, texts: list[str]) -> np.ndarray:
        """Vectors of a batch, counting the texts the model's context truncates (one tokenisation)."""
        tokens = encoder.tokenize(texts)
        self.report.truncated += int((tokens[:, -1] != 0).sum())
        return encoder.embed_text_tokens(tokens)

    def _index(self) -> Any:
        if self.index is None and not self.outgrown:
            self.index = self.home.index("text")
            self._check_fit()
        return self.index

    def _check_fit(self) -> None:
        from mmsearch.index import fits

        if self.index is not None and not fits(self.index, self.index.count):
            self.index, self.outgrown = None, True

    def finish(self) -> None:
        """Save the index (built afresh from the catalog if it outgrew its type during the run)."""
        from mmsearch.index import build_from_catalog

        home = self.home
        if not self.wrote:
            home.ensure_index_current("text")  # a killed run may have left it stale
            return
        index = self.index
        if index is None:
            index = build_from_catalog(
                home.catalog, "text", home.dim, home.spec.canonical, home.settings.index_path("text")
            )
        home.save_index(index)


def add_texts(
    home: Home,
    path: Path,
    *,
    progress: bool | Callable[[int, int], None] = True,
    on_warning: Callable[[str], None] | None = None,
    chunk: int | None = None,
) -> TextReport:
    """Add (or update) the texts of a corpus file, streaming; unchanged texts are not encoded again.

    ``progress``: a bar on stderr (``True``), none, or ``progress(done, total)``
    called after each chunk. ``chunk`` texts (default :data:`CHUNK` scaled by the batch size) make one
    catalog transaction; see the module docstring.
    """
    from tqdm import tqdm

    started = time.perf_counter()
    path = Path(path).expanduser()
    if not path.exists():
        raise InputFileError(f"no such file: {path}")
    _check_suffix(path)
    batch = home.settings.batch_size * 4
    chunk = chunk or max(batch, CHUNK * home.settings.batch_size // 32)
    with home.write_lock():
        scan = scan_corpus(path, progress is True)
        report = TextReport(skipped=scan.empty)
        writer = _TextWriter(home, str(path.resolve()), report, batch)
        total = scan.count - len(scan.dropped)
        bar = None
        finished = 0
        try:
            for part in _chunks(_unique_items(path, scan, report), chunk):
                done = writer.put(part)  # the first chunk loads the model, if anything is to be encoded
                if bar is None:
                    bar = tqdm(total=total, unit="text", disable=progress is not True,
                               file=sys.stderr, dynamic_ncols=True)
                bar.update(done)
                finished += done
                if callable(progress):
                    progress(finished, total)
        finally:
            if bar is not None:
                bar.close()
        # after a failure the index is not saved: its sidecar lags the catalog, so it is rebuilt when next opened
        writer.finish()
    if report.truncated and on_warning is not None:
        on_warning(
            f"{report.truncated} text(s) in {path} are longer than the model's "
            f"{home.encoder().context_length}-token context and were truncated"
        )
    report.seconds = time.perf_counter() - started
    return report
