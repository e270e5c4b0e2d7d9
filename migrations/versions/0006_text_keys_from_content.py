"""re-key texts that had no id of their own: FILENAME:LINE -> NAME#HASH

A text without a corpus id used to be keyed ``FILENAME:LINE``: a second
corpus of the same file name replaced the first one's texts, and a line
inserted at the top moved every key after it. Such texts are now keyed by
their corpus's absolute path and their content (``mmsearch.texts.text_key``);
this revision gives stored texts the key they get when their corpus is added
again, from the absolute path and the text the catalog holds, so re-adding
it finds every text unchanged. A row counts as keyed the old way when its
key is ``NAME:DIGITS`` and NAME is the file name of its source (or has the
source's suffix, for a corpus added through a link of another name); other
keys are corpus ids and are kept. Where one corpus held the same text on
several lines, the last line's row is kept and the others are deleted (as
adding it now keeps one text); the text generation is then bumped, so the
FAISS index is rebuilt without them. Vectors and ids do not change.

Reads the texts a few thousand rows at a time; the new keys wait in a
temporary table.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 11:00:00
"""
import hashlib
import os
import re

import sqlalchemy as sa
from alembic import op


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

_OLD_KEY = re.compile(r"^(?P<name>[^/]+):(?P<line>[0-9]+)$")
_PAGE = 5000


def _key(source: str, text: str, long: bool) -> str:
    """``mmsearch.texts.text_key``, frozen here as this revision applies it."""
    digest = hashlib.blake2b(
        source.encode("utf-8", "surrogateescape") + b"\0" + text.encode("utf-8", "surrogatepass"),
        digest_size=16 if long else 8,
    ).hexdigest()
    return f"{os.path.basename(source)}#{digest}"


def _old_line(key: str, source: str) -> int | None:
    """The line number of a key made by the FILENAME:LINE rule, None for a corpus id."""
    found = _OLD_KEY.match(key)
    if found is None:
        return None
    name, base = found["name"], os.path.basename(source)
    if name == base or os.path.splitext(name)[1].lower() == os.path.splitext(base)[1].lower() != "":
        return int(found["line"])
    return None


def upgrade() -> None:
    conn = op.get_bind()
    conn.exec_driver_sql(
        "CREATE TEMPORARY TABLE rekey_0006 (id INTEGER PRIMARY KEY, line INTEGER NOT NULL, "
        "short_key TEXT NOT NULL, long_key TEXT NOT NULL)"
    )
    last = -1
    while True:
        rows = conn.execute(
            sa.text("SELECT id, key, source, text FROM texts WHERE id > :last ORDER BY id LIMIT :page"),
            {"last": last, "page": _PAGE},
        ).fetchall()
        if not rows:
            break
        last = rows[-1][0]
        found = []
        for i, key, source, text in rows:
            line = _old_line(key, source)
            if line is not None:
                found.append((i, line, _key(source, text, False), _key(source, text, True)))
        if found:
            conn.execute(
                sa.text("INSERT INTO rekey_0006 VALUES (:i, :line, :short, :long)"),
                [dict(zip(("i", "line", "short", "long"), row)) for row in found],
            )

    # one group per (source, text), which the long key names; the last line of a group is kept.
    # Read through one cursor while texts is written: the cursor reads only the temporary table.
    groups = conn.exec_driver_sql("SELECT id, short_key, long_key FROM rekey_0006 ORDER BY long_key, line DESC, id DESC")
    deleted = 0
    previous = None
    doomed: list[int] = []
    for i, short_key, long_key in groups:
        if long_key == previous:
            doomed.append(i)
            if len(doomed) >= _PAGE:
                deleted += _delete(conn, doomed)
        else:
            previous = long_key
            # a short key already taken (a corpus id spelt so, or a 64-bit collision): the long one
            taken = conn.execute(
                sa.text("SELECT 1 FROM texts WHERE key = :key AND id != :i"), {"key": short_key, "i": i}
            ).first()
            conn.execute(
                sa.text("UPDATE texts SET key = :key WHERE id = :i"), {"key": long_key if taken else short_key, "i": i}
            )
    deleted += _delete(conn, doomed)
    conn.exec_driver_sql("DROP TABLE rekey_0006")
    if deleted:
        current = conn.exec_driver_sql("SELECT value FROM meta WHERE key = 'generation.text'").scalar()
        if current is None:
            conn.exec_driver_sql("INSERT INTO meta (key, value) VALUES ('generation.text', '1')")
        else:
            conn.execute(
                sa.text("UPDATE meta SET value = :value WHERE key = 'generation.text'"), {"value": str(int(current) + 1)}
            )


def _delete(conn, ids: list[int]) -> int:
    count = len(ids)
    for start in range(0, count, 500):
        chunk = ids[start:start + 500]
        conn.execute(sa.text("DELETE FROM texts WHERE id IN :ids").bindparams(sa.bindparam("ids", expanding=True)),
                     {"ids": chunk})
    ids.clear()
    return count


def downgrade() -> None:
    # The old keys' line numbers are gone; older revisions read the new keys as corpus ids.
    pass
