"""Text corpora: read ``.txt``, ``.jsonl`` and ``.csv`` files and add their texts to a home.

Every text has a key: the ``id`` the file gives it, else ``FILENAME:LINE``.
Adding a text whose key is already stored replaces it (and its vector, if
the text changed); within one file, a repeated id keeps the last occurrence.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mmsearch.errors import InputFileError
from mmsearch.home import Home

SUFFIXES = (".txt", ".jsonl", ".csv")


@dataclass(frozen=True, slots=True)
class TextItem:
    key: str
    text: str
    meta: dict[str, Any] | None = None


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


def _read_utf8(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InputFileError(f"{path}:{line}: not valid UTF-8 (byte {exc.start})") from None


def read_corpus(path: Path) -> tuple[list[TextItem], int, int]:
    """``(items, empty lines skipped, duplicate ids dropped)``; bad files raise InputFileError."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InputFileError(f"{path}: unsupported text corpus type {suffix or '(none)'}; use .txt, .jsonl or .csv")
    content = _read_utf8(path)
    items: list[TextItem] = []
    skipped = 0
    if suffix == ".txt":
        for number, line in enumerate(content.splitlines(), 1):
            text = line.strip()
            if not text:
                skipped += 1
                continue
            items.append(TextItem(f"{path.name}:{number}", text))
    elif suffix == ".jsonl":
        for number, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                skipped += 1
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputFileError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            item = _record_item(record, path, number)
            if item is None:
                skipped += 1
            else:
                items.append(item)
    else:
        reader = csv.DictReader(io.StringIO(content, newline=""))
        if reader.fieldnames is None or "text" not in reader.fieldnames:
            raise InputFileError(f"{path}: a CSV corpus needs a 'text' column")
        for record in reader:
            item = _record_item(record, path, reader.line_num)
            if item is None:
                skipped += 1
            else:
                items.append(item)
    unique: dict[str, TextItem] = {}
    for item in items:
        unique.pop(item.key, None)
        unique[item.key] = item
    return list(unique.values()), skipped, len(items) - len(unique)


def _record_item(record: Any, path: Path, number: int) -> TextItem | None:
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
    raw_id = record.get("id")
    key = str(raw_id) if raw_id not in (None, "") else f"{path.name}:{number}"
    meta = {k: v for k, v in record.items() if k not in ("text", "id") and v not in (None, "")}
    return TextItem(key, text.strip(), meta or None)


def add_texts(
    home: Home,
    path: Path,
    *,
    progress: bool | Callable[[int, int], None] = True,
    on_warning: Callable[[str], None] | None = None,
) -> TextReport:
    """Add (or update) the texts of a corpus file; unchanged texts are not encoded again.

    ``progress``: a bar on stderr (``True``), none, or ``progress(done, total)`` called per batch.
    """
    from tqdm import tqdm

    started = time.perf_counter()
    path = Path(path).expanduser()
    if not path.exists():
        raise InputFileError(f"no such file: {path}")
    items, empty, duplicates = read_corpus(path)
    report = TextReport(skipped=empty, duplicates=duplicates)
    with home.write_lock():
        stored = home.catalog.text_states([it.key for it in items])
        todo = []
        for item in items:
            known = stored.get(item.key)
            if known is not None and known[1] == item.text:
                report.unchanged += 1
            else:
                todo.append(item)
        if not todo:
            home.ensure_index_current("text")  # a killed run may have left it stale
        else:
            encoder = home.encoder()
            index = home.index("text")
            # shortest first: each batch runs at its own real token length
            order = sorted(todo, key=lambda it: len(it.text))
            batch = home.settings.batch_size * 4
            bar = tqdm(total=len(order), unit="text", disable=progress is not True, file=sys.stderr, dynamic_ncols=True)
            try:
                for start in range(0, len(order), batch):
                    chunk = order[start:start + batch]
                    tokens = encoder.tokenize([it.text for it in chunk])
                    report.truncated += int((tokens[:, -1] != 0).sum())
                    vectors = home.catalog.stored(encoder.embed_texts([it.text for it in chunk]))
                    new, changed, new_vecs, changed_vecs, changed_ids = [], [], [], [], []
                    for item, vector in zip(chunk, vectors):
                        row = {
                            "key": item.key,
                            "text": item.text,
                            "source": str(path.resolve()),
                            "meta": json.dumps(item.meta, ensure_ascii=False) if item.meta else None,
                            "vector": vector,
                        }
                        if item.key in stored:
                            changed.append({"id": stored[item.key][0], **row})
                            changed_ids.append(stored[item.key][0])
                            changed_vecs.append(vector)
                        else:
                            new.append(row)
                            new_vecs.append(vector)
                    new_ids = home.catalog.write_texts(new, changed)
                    if changed_ids:
                        ids = np.array(changed_ids, dtype=np.int64)
                        index.remove(ids)
                        index.add(ids, np.stack(changed_vecs))
                    if new_ids:
                        index.add(np.array(new_ids, dtype=np.int64), np.stack(new_vecs))
                    report.added += len(new_ids)
                    report.updated += len(changed_ids)
                    bar.update(len(chunk))
                    if callable(progress):
                        progress(min(start + batch, len(order)), len(order))
            finally:
                bar.close()
            home.save_index(index)
    if report.truncated and on_warning is not None:
        on_warning(
            f"{report.truncated} text(s) in {path} are longer than the model's "
            f"{home.encoder().context_length}-token context and were truncated"
        )
    report.seconds = time.perf_counter() - started
    return report
