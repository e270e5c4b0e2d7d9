"""Settings, resolved once: command-line flag, then ``MMSEARCH_*`` variable, then default.

The resolved :class:`Settings` is frozen and passed down; no other module reads
the environment for these values.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from mmsearch.errors import UsageError
from mmsearch.files import DEFAULT_MAX_FILE_SIZE

#: The model used when a home has none recorded and none is asked for.
#: ViT-B-32 trained on LAION-2B: 66.6% ImageNet zero-shot, 512-d vectors,
#: ~88M image-tower parameters; the best quality per CPU-second among the
#: plain ViT CLIPs whose token states the re-ranker can read.
DEFAULT_MODEL = "ViT-B-32:laion2b_s34b_b79k"

#: What ``--text-precision`` accepts.
TEXT_PRECISIONS = ("auto", "float32", "bfloat16")


def default_home() -> Path:
    from platformdirs import user_data_dir

    return Path(user_data_dir("mmsearch", appauthor=False))


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"{name}={raw!r} is not a whole number") from None


def _env_bool(name: str) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise UsageError(f"{name}={os.environ[name]!r} is not a yes/no value (use 1 or 0)")


_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)


def parse_size(raw: str | int, what: str = "size") -> int:
    """Bytes from ``"200MB"``, ``"1G"``, ``"1.5GiB"``, ``"500k"`` or a plain number of bytes.

    k/M/G/T are powers of 1000, KiB/MiB/GiB/TiB powers of 1024; ``what`` names
    the value in the error for anything else.
    """
    if isinstance(raw, int):
        value = raw
    else:
        match = _SIZE.match(raw)
        if not match or (match.group(3) and not match.group(2)):
            raise UsageError(f"{what} {raw!r} is not a size (say 200MB, 1G or 1.5GiB)")
        number, prefix, binary = match.group(1), match.group(2).lower(), match.group(3)
        power = "kmgt".index(prefix) + 1 if prefix else 0
        value = int(float(number) * (1024 if binary else 1000) ** power)
    if value < 1:
        raise UsageError(f"{what} must be at least 1 byte, got {raw!r}")
    return value


#: URL schemes ``--catalog`` takes: SQLAlchemy's PostgreSQL dialect through psycopg 3.
CATALOG_SCHEMES = ("postgresql+psycopg", "postgresql")


def check_catalog_url(url: str) -> str:
    """``url`` if it names a catalog mmsearch can use (a PostgreSQL database), else a :class:`UsageError`.

    A plain ``postgresql://`` URL is taken as ``postgresql+psycopg://`` (psycopg 3
    is the driver the ``[postgres]`` extra installs). The error names the URL
    without its password.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UsageError(f"--catalog {url_without_password(url)!r} is not a database URL "
                         "(say postgresql+psycopg://USER@HOST/DB)") from None
    if parsed.drivername not in CATALOG_SCHEMES:
        raise UsageError(
            f"--catalog {url_without_password(url)!r}: only PostgreSQL catalogs are supported "
            "(postgresql+psycopg://USER@HOST/DB); leave it out for the home's own SQLite file"
        )
    if not parsed.database:
        raise UsageError(f"--catalog {url_without_password(url)!r} names no database (…@HOST/DB)")
    return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def url_without_password(url: str) -> str:
    """``url`` as it may be shown (status, errors): any password left out, in the user part or the query."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return re.sub(r"(//[^/:@]*):[^/@]*@", r"\1@", url)  # user:password@ -> user@, whatever the rest is
    # URL.set() takes None as "unchanged": the password goes through _replace
    shown = parsed._replace(password=None).set(query={}).render_as_string(hide_password=False)
    query = [
        f"{key}={value}" for key, values in parsed.query.items() if key.lower() != "password"
        for value in ((values,) if isinstance(values, str) else values)
    ]
    return shown + ("?" + "&".join(query) if query else "")


@dataclass(frozen=True)
class Settings:
    """Everything a command needs to know about where and how to work."""

    home: Path
    #: The model asked for with ``--model``/``MMSEARCH_MODEL``; ``None`` means
    #: "the one this home was built with, else :data:`DEFAULT_MODEL`".
    model: str | None = None
    #: ``auto`` picks CUDA when present, else the CPU.
    device: str = "auto"
    batch_size: int = 32
    #: Indexing threads: CPU lanes that each decode and encode (mmsearch.indexer),
    #: or decode threads feeding a GPU; 0 does everything in the calling thread.
    workers: int = 2
    #: Encode images with int8 dynamic quantisation (CPU only; see mmsearch.quantize).
    int8: bool = False
    #: How texts are encoded: ``auto`` (bfloat16 on a CPU with native bfloat16,
    #: else float32), ``float32`` or ``bfloat16`` (see mmsearch.encode.load_encoder).
    text_precision: str = "auto"
    #: Bytes read from one image file at most; a larger file is skipped (mmsearch.files).
    max_file_size: int = DEFAULT_MAX_FILE_SIZE
    #: Where the catalog lives, as given (``--catalog``/``MMSEARCH_CATALOG``): a
    #: ``postgresql+psycopg://`` URL, or ``None`` for the home's own SQLite file.
    catalog: str | None = None

    @property
    def catalog_path(self) -> Path:
        """The home's own SQLite catalog (used when :attr:`catalog` is ``None``)."""
        return self.home / "catalog.sqlite3"

    @property
    def catalog_on_server(self) -> bool:
        """Whether the catalog is on a database server rather than in the home's SQLite file."""
        return self.catalog is not None

    def index_path(self, kind: str) -> Path:
        return self.home / f"{kind}s.faiss"

    @property
    def lock_path(self) -> Path:
        return self.home / "write.lock"


def resolve(
    home: Path | None = None,
    model: str | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    int8: bool | None = None,
    max_file_size: int | str | None = None,
    catalog: str | None = None,
    text_precision: str | None = None,
) -> Settings:
    """Build :class:`Settings` from explicit values, the environment and defaults."""
    home_raw = home if home is not None else os.environ.get("MMSEARCH_HOME") or None
    resolved_home = Path(home_raw).expanduser() if home_raw else default_home()
    model = model or os.environ.get("MMSEARCH_MODEL") or None
    device = device or os.environ.get("MMSEARCH_DEVICE") or "auto"
    cpus = os.cpu_count() or 1
    batch_size = batch_size if batch_size is not None else _env_int("MMSEARCH_BATCH_SIZE", 32)
    workers = workers if workers is not None else _env_int("MMSEARCH_WORKERS", min(4, cpus))
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    if workers < 0:
        raise UsageError(f"workers must be 0 or more, got {workers}")
    if max_file_size is not None:
        max_size = parse_size(max_file_size, "--max-file-size")
    elif os.environ.get("MMSEARCH_MAX_FILE_SIZE"):
        max_size = parse_size(os.environ["MMSEARCH_MAX_FILE_SIZE"], "MMSEARCH_MAX_FILE_SIZE")
    else:
        max_size = DEFAULT_MAX_FILE_SIZE
    catalog = catalog or os.environ.get("MMSEARCH_CATALOG") or None
    named, raw_precision = (
        ("--text-precision", text_precision) if text_precision
        else ("MMSEARCH_TEXT_PRECISION", os.environ.get("MMSEARCH_TEXT_PRECISION") or "auto")
    )
    precision = raw_precision.strip().lower()
    if precision not in TEXT_PRECISIONS:
        raise UsageError(f"{named} {raw_precision!r} is not one of {', '.join(TEXT_PRECISIONS)}")
    return Settings(
        catalog=check_catalog_url(catalog) if catalog is not None else None,
        home=resolved_home.resolve(),
        model=model,
        device=device,
        batch_size=batch_size,
        workers=workers,
        int8=int8 if int8 is not None else _env_bool("MMSEARCH_INT8"),
        max_file_size=max_size,
        text_precision=precision,
    )
