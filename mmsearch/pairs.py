"""Image–caption pair files for training and evaluation: JSONL or CSV with ``image`` and ``text``.

``image`` is a path relative to the pair file's folder (or absolute).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmsearch.errors import InputFileError


@dataclass(frozen=True)
class Pair:
    image: Path
    text: str


def read_pairs(path: Path) -> list[Pair]:
    """Every pair of the file, in order; a bad line or a missing image is one clear error."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputFileError(f"no such pair file: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise InputFileError(f"{path}: pair files are .jsonl or .csv (with 'image' and 'text'), not {suffix or '(none)'}")
    try:
        content = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputFileError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    records: list[tuple[int, Any]] = []
    if suffix == ".jsonl":
        for number, line in enumerate(content.splitlines(), 1):
            if line.strip():
                try:
                    records.append((number, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise InputFileError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
    else:
        reader = csv.DictReader(io.StringIO(content, newline=""))
        if reader.fieldnames is None or not {"image", "text"} <= set(reader.fieldnames):
            raise InputFileError(f"{path}: a CSV pair file needs 'image' and 'text' columns")
        records = [(reader.line_num, row) for row in reader]
    pairs = []
    base = path.parent
    for number, record in records:
        if not isinstance(record, dict):
            raise InputFileError(f"{path}:{number}: expected an object with 'image' and 'text'")
        image, text = record.get("image"), record.get("text")
        if not isinstance(image, str) or not image.strip():
            raise InputFileError(f"{path}:{number}: 'image' must be a non-empty path")
        if not isinstance(text, str) or not text.strip():
            raise InputFileError(f"{path}:{number}: 'text' must be a non-empty string")
        image_path = (base / image).resolve()
        if not image_path.is_file():
            raise InputFileError(f"{path}:{number}: no such image: {image_path}")
        pairs.append(Pair(image_path, text.strip()))
    if not pairs:
        raise InputFileError(f"{path}: no pairs in it")
    return pairs


def group(pairs: list[Pair]) -> tuple[list[Path], list[str], list[tuple[int, int]]]:
    """Unique images, unique texts, and the (image index, text index) links between them."""
    images: dict[Path, int] = {}
    texts: dict[str, int] = {}
    links = set()
    for pair in pairs:
        i = images.setdefault(pair.image, len(images))
        j = texts.setdefault(pair.text, len(texts))
        links.add((i, j))
    return list(images), list(texts), sorted(links)
