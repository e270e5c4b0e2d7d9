"""The catalog's tables: typed SQLAlchemy 2 models, one place for every dialect."""

from __future__ import annotations

from typing import Literal, NamedTuple

from sqlalchemy import BigInteger, Double, Integer, LargeBinary, MetaData, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

Kind = Literal["image", "text"]
KINDS: tuple[Kind, ...] = ("image", "text")

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


#: Byte sizes and nanosecond times: 64-bit on PostgreSQL, where INTEGER is 32-bit (SQLite's
#: INTEGER already holds 64 bits, so its catalogs are unchanged).
Int64 = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Meta(Base):
    """Key/value facts about the home: model spec, vector dimension, generation."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String, primary_key=True)
    value: Mapped[str] = mapped_column(String)


class ImageRow(Base):
    """One indexed image file; ``id`` is its FAISS id."""

    __tablename__ = "images"
    # ids are never reused, so a stale FAISS entry can never point at a new file
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(primary_key=True)
    path: Mapped[str] = mapped_column(String, unique=True)
    size: Mapped[int] = mapped_column(Int64)
    mtime_ns: Mapped[int] = mapped_column(Int64)
    # not indexed: random keys made every bulk insert rewrite the index (migration 0005)
    content_hash: Mapped[str] = mapped_column(String)
    width: Mapped[int]
    height: Mapped[int]
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    indexed_at: Mapped[float] = mapped_column(Double)


class TextRow(Base):
    """One text of a corpus; ``id`` is its FAISS id, ``key`` the user's id."""

    __tablename__ = "texts"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String, unique=True)
    text: Mapped[str] = mapped_column(String)
    source: Mapped[str] = mapped_column(String)
    meta: Mapped[str | None] = mapped_column(String, nullable=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    indexed_at: Mapped[float] = mapped_column(Double)


class SkippedRow(Base):
    """A file that could not be decoded, remembered so an unchanged one is not read again."""

    __tablename__ = "skipped"

    path: Mapped[str] = mapped_column(String, primary_key=True)
    size: Mapped[int] = mapped_column(Int64)
    mtime_ns: Mapped[int] = mapped_column(Int64)
    reason: Mapped[str] = mapped_column(String)


class StagedRow(Base):
    """A vector of the model a ``reindex`` is switching to, made before the switch (mmsearch.reindex).

    One per catalogued image or text (``id`` is its row's id). ``source`` says
    what the vector was made from: an image's content hash, a text's digest.
    An image's row also keeps the file's size, mtime and picture size as read,
    which the switch writes into the image's row with the vector.
    """

    __tablename__ = "staged_vectors"

    kind: Mapped[str] = mapped_column(String, primary_key=True)
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    source: Mapped[str] = mapped_column(String)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    size: Mapped[int | None] = mapped_column(Int64)
    mtime_ns: Mapped[int | None] = mapped_column(Int64)
    width: Mapped[int | None]
    height: Mapped[int | None]


TABLES: dict[Kind, type[ImageRow] | type[TextRow]] = {"image": ImageRow, "text": TextRow}


class ImageState(NamedTuple):
    """What the catalog knows of a file, enough to tell whether it changed.

    A named tuple: the unchanged check builds one per catalogued file, and a
    frozen dataclass cost ~5x as much to make.
    """

    id: int
    size: int
    mtime_ns: int
    content_hash: str
