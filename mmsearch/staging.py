"""The staged vectors of a model switch: filled as a ``reindex`` goes, moved in at once.

While ``mmsearch --model NEW reindex`` runs, the new model's vectors wait in
the catalog's ``staged_vectors`` table, committed a batch at a time, and the
home keeps answering with the old ones. The meta keys ``reindex_model``,
``reindex_model_hash`` and ``reindex_dim`` say which model they belong to,
so a run killed midway goes on from them, and a run for another model
starts afresh. :meth:`Staging.switch` then moves them into ``images`` and
``texts``, records the new model and bumps the generations, in one
transaction: a reader sees the old model or the new one, never a mix.

SQLAlchemy Core only, so every catalog backend runs the same statements.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from sqlalchemy import and_, delete, exists, func, insert, select, update

from mmsearch.codecs import from_blobs, row_views
from mmsearch.errors import CatalogError
from mmsearch.schema import ImageRow, Kind, Meta, StagedRow, TextRow
from mmsearch.store import Catalog

#: The meta keys that name the model a staging area belongs to.
STAGING_KEYS = ("reindex_model", "reindex_model_hash", "reindex_dim")

#: Rows written or looked up per statement.
_PAGE = 500


def text_source(text: str) -> str:
    """What a text's staged vector was made from: a digest of the text (it changes when the text does)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


class Staging:
    """The staging area of one catalog (the caller holds the home's write lock)."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog

    def target(self) -> dict[str, str]:
        """The ``reindex_*`` meta keys of the switch in progress (empty when none is)."""
        with self.catalog.engine.connect() as conn:
            rows = conn.execute(select(Meta.key, Meta.value).where(Meta.key.in_(STAGING_KEYS))).all()
        return {k: v for k, v in rows}

    def count(self) -> int:
        with self.catalog.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(StagedRow)).scalar_one())

    def begin(self, model: str, model_hash: str | None, dim: int) -> int:
        """Make the staging area belong to ``model``; what an earlier run staged for it is kept.

        Rows staged for another model (or another version of a local model's
        files, or another dimension) are deleted. Returns how many rows are kept.
        """
        wanted = {"reindex_model": model, "reindex_model_hash": model_hash or "", "reindex_dim": str(dim)}
        if self.target() == wanted:
            return self.count()
        with self.catalog.transaction() as conn:
            conn.execute(delete(StagedRow))
            conn.execute(delete(Meta).where(Meta.key.in_(STAGING_KEYS)))
            conn.execute(insert(Meta), [{"key": k, "value": v} for k, v in wanted.items()])
        return 0

    def abandon(self) -> None:
        """Forget a switch in progress and its staged vectors."""
        with self.catalog.transaction() as conn:
            conn.execute(delete(StagedRow))
            conn.execute(delete(Meta).where(Meta.key.in_(STAGING_KEYS)))

    def finished(self, key: str) -> None:
        """Delete the meta ``key`` that said the work after a switch was still to do."""
        with self.catalog.transaction() as conn:
            conn.execute(delete(Meta).where(Meta.key == key))

    def sources(self, kind: Kind) -> dict[int, str]:
        """``id -> source`` of every staged row of ``kind``."""
        with self.catalog.engine.connect() as conn:
            rows = conn.execute(select(StagedRow.id, StagedRow.source).where(StagedRow.kind == kind))
            return {int(i): s for i, s in rows}

    def put(self, kind: Kind, rows: Sequence[dict[str, Any]]) -> None:
        """Stage rows (``id``, ``source``, ``vector`` as a numpy array; images also ``size``,
        ``mtime_ns``, ``width``, ``height``), replacing what was staged for those ids. One transaction."""
        if not rows:
            return
        vectors = self.catalog.stored(np.stack([row["vector"] for row in rows]))
        blobs = [bytes(view) for view in row_views(np.ascontiguousarray(vectors))]
        values = [
            {
                "kind": kind, "id": int(row["id"]), "source": row["source"], "vector": blob,
                "size": row.get("size"), "mtime_ns": row.get("mtime_ns"),
                "width": row.get("width"), "height": row.get("height"),
            }
            for row, blob in zip(rows, blobs)
        ]
        ids = [v["id"] for v in values]
        with self.catalog.transaction() as conn:
            for start in range(0, len(ids), _PAGE):
                chunk = ids[start:start + _PAGE]
                conn.execute(delete(StagedRow).where(and_(StagedRow.kind == kind, StagedRow.id.in_(chunk))))
            conn.execute(insert(StagedRow), values)

    def staged(self, kind: Kind, ids: Sequence[int], dim: int) -> dict[int, tuple[np.ndarray, int, int]]:
        """``id -> (vector, width, height)`` of staged rows (to give a copy of a picture its twin's vector)."""
        out: dict[int, tuple[np.ndarray, int, int]] = {}
        ids = [int(i) for i in ids]
        with self.catalog.engine.connect() as conn:
            for start in range(0, len(ids), _PAGE):
                stmt = select(StagedRow.id, StagedRow.vector, StagedRow.width, StagedRow.height).where(
                    and_(StagedRow.kind == kind, StagedRow.id.in_(ids[start:start + _PAGE]))
                )
                for i, blob, width, height in conn.execute(stmt):
                    out[int(i)] = (from_blobs([blob], dim, self.catalog.vector_dtype)[0], width or 0, height or 0)
        return out

    def switch(self, meta: dict[str, str | None], removed_images: Sequence[int] = ()) -> None:
        """Move the staged vectors in and record the new model, in one transaction.

        ``meta`` holds the new model's keys (``model``, ``dim``, ...; ``None``
        deletes a key); ``removed_images`` are deleted first (files that
        vanished). Every remaining image and text must have a staged row, else
        nothing changes. Images also take the file's size, mtime, content hash
        and picture size as they were read for the new vector.
        """
        removed = [int(i) for i in removed_images]
        with self.catalog.transaction() as conn:
            for start in range(0, len(removed), _PAGE):
                chunk = removed[start:start + _PAGE]
                conn.execute(delete(ImageRow).where(ImageRow.id.in_(chunk)))
            for kind, table in (("image", ImageRow), ("text", TextRow)):
                staged = and_(StagedRow.kind == kind, StagedRow.id == table.id)
                missing = conn.execute(
                    select(func.count()).select_from(table).where(~exists().where(staged))
                ).scalar_one()
                if missing:
                    raise CatalogError(
                        f"{missing} {kind}s of {self.catalog.label} have no vector of the new model yet; "
                        "nothing was changed, run reindex again"
                    )
            image = StagedRow.kind == "image"
            conn.execute(
                update(ImageRow)
                .where(and_(image, StagedRow.id == ImageRow.id))
                .values(
                    vector=StagedRow.vector, content_hash=StagedRow.source, size=StagedRow.size,
                    mtime_ns=StagedRow.mtime_ns, width=StagedRow.width, height=StagedRow.height,
                )
            )
            conn.execute(
                update(TextRow)
                .where(and_(StagedRow.kind == "text", StagedRow.id == TextRow.id))
                .values(vector=StagedRow.vector)
            )
            generations = [f"generation.{kind}" for kind in ("image", "text")]
            current = dict(conn.execute(select(Meta.key, Meta.value).where(Meta.key.in_([*generations, "model_generation"]))).all())
            values: dict[str, str | None] = {
                **meta,
                **{key: str(int(current.get(key) or 0) + 1) for key in (*generations, "model_generation")},
                **{key: None for key in STAGING_KEYS},
            }
            conn.execute(delete(Meta).where(Meta.key.in_(list(values))))
            kept = [{"key": k, "value": v} for k, v in values.items() if v is not None]
            if kept:
                conn.execute(insert(Meta), kept)
            conn.execute(delete(StagedRow))


def iter_texts(catalog: Catalog, chunk: int = 4096) -> Iterator[list[tuple[int, str]]]:
    """Every stored text as ``(id, text)``, in id order, ``chunk`` rows at a time."""
    last = -1
    while True:
        stmt = select(TextRow.id, TextRow.text).where(TextRow.id > last).order_by(TextRow.id).limit(chunk)
        with catalog.engine.connect() as conn:  # not held while the caller writes what it staged
            rows = [(int(i), t) for i, t in conn.execute(stmt)]
        if not rows:
            return
        yield rows
        last = rows[-1][0]
