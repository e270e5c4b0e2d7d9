"""A home: one catalog, its FAISS indexes, and the model that made their vectors."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from mmsearch import modelspec
from mmsearch.errors import HomeLockedError, ModelMismatchError
from mmsearch.settings import DEFAULT_MODEL, Settings
from mmsearch.store import Catalog, Kind

if TYPE_CHECKING:
    from mmsearch.encode import Encoder
    from mmsearch.index import VectorIndex


class Home:
    """Open with :meth:`open`; the encoder is loaded only when first needed."""

    def __init__(self, settings: Settings, catalog: Catalog):
        self.settings = settings
        self.catalog = catalog
        self._encoder: Encoder | None = None
        #: Called with the spec just before the model loads: a front end's hook for its
        #: once-per-process set-up (see mmsearch.runtime.prepare_model_access).
        self.before_model_load: Callable[[modelspec.ModelSpec], None] | None = None
        self.spec = self._resolve_spec()

    @classmethod
    def open(cls, settings: Settings, *, create: bool = True) -> "Home":
        return cls(settings, Catalog.open(settings.catalog_path, create=create))

    def close(self) -> None:
        self.catalog.close()

    def __enter__(self) -> "Home":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- model --------------------------------------------------------------

    @property
    def recorded_model(self) -> str | None:
        return self.catalog.get_meta("model")

    @property
    def dim(self) -> int | None:
        raw = self.catalog.get_meta("dim")
        return int(raw) if raw else None

    def _resolve_spec(self) -> modelspec.ModelSpec:
        recorded = self.recorded_model
        if self.settings.model is None:
            return modelspec.parse(recorded or DEFAULT_MODEL)
        asked = modelspec.parse(self.settings.model)
        if recorded is not None and asked.canonical != recorded:
            raise ModelMismatchError(
                f"{self.settings.home} was indexed with model {recorded}, not {asked.canonical}; "
                f"drop --model to use {recorded}, or pass --home DIR for a separate index"
            )
        return asked

    def encoder(self) -> "Encoder":
        """The home's encoder, loaded on first use; records the model in a new home."""
        if self._encoder is None:
            from mmsearch.encode import load_encoder

            if self.before_model_load is not None:
                self.before_model_load(self.spec)
            encoder = load_encoder(self.spec, self.settings.device, int8=self.settings.int8)
            dim = self.dim
            if dim is not None and dim != encoder.dim:
                raise ModelMismatchError(
                    f"model {self.spec} makes {encoder.dim}-d vectors, but {self.settings.home} holds {dim}-d ones"
                )
            if self.recorded_model is None:
                self.catalog.set_meta({"model": self.spec.canonical, "dim": str(encoder.dim)})
            self._encoder = encoder
        return self._encoder

    # -- indexes ------------------------------------------------------------

    def index(self, kind: Kind) -> "VectorIndex":
        """The FAISS index of ``kind``, rebuilt from the catalog if it is stale."""
        from mmsearch.index import VectorIndex, open_index

        dim = self.dim
        if dim is None:
            return VectorIndex.empty(kind, 1, self.spec.canonical)
        return open_index(
            self.catalog, self.settings.index_path(kind), kind, dim, self.spec.canonical,
            on_rebuild=self._save_rebuilt,
        )

    def save_index(self, index: "VectorIndex") -> None:
        """Save a writer's index (the caller holds :meth:`write_lock`)."""
        index.generation = self.catalog.generation(index.kind)
        with self.save_lock():
            self._save(index)

    def ensure_index_current(self, kind: Kind) -> None:
        """Rebuild and save an index whose sidecar lags the catalog (a run killed before its save)."""
        from mmsearch.index import sidecar_is_current

        dim = self.dim
        path = self.settings.index_path(kind)
        if dim is not None and not sidecar_is_current(path, self.catalog.generation(kind), dim, self.spec.canonical):
            self.index(kind)

    def _save(self, index: "VectorIndex") -> None:
        """Save under the save lock; temp files of saves killed midway are removed first."""
        from mmsearch.index import temp_files

        path = self.settings.index_path(index.kind)
        for stale in temp_files(path):  # no other save is in flight: we hold the save lock
            stale.unlink(missing_ok=True)
        index.save(path)

    def _save_rebuilt(self, index: "VectorIndex") -> None:
        """Save an index rebuilt from the catalog, if it is still current.

        Readers (``search``) rebuild too, possibly while a writer runs. The
        index file and its sidecar are two renames, so every save holds the
        save lock (never a reader+writer mix of the two files), and a rebuild
        that a writer's commit has since outdated is not saved at all. A home
        we cannot write to (read-only media) keeps the rebuild in memory.
        """
        try:
            with self.save_lock():
                if self.catalog.generation(index.kind) == index.generation:
                    self._save(index)
        except (OSError, RuntimeError):  # RuntimeError: FAISS's own write errors
            pass

    @contextmanager
    def save_lock(self) -> Iterator[None]:
        """Held for the few renames of an index save; blocking, never for long."""
        fd = os.open(self.settings.home / "index.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- writers ------------------------------------------------------------

    @contextmanager
    def write_lock(self) -> Iterator[None]:
        """Only one writer per home; a second one fails at once with a clear message."""
        path: Path = self.settings.lock_path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
                raise HomeLockedError(
                    f"{self.settings.home} is being written by pid {holder}; wait for it to finish"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield
        finally:
            os.close(fd)


def status(settings: Settings) -> dict[str, object]:
    """What a home holds: counts, model, sizes on disk."""
    out: dict[str, object] = {"home": str(settings.home), "exists": settings.catalog_path.exists()}
    if not settings.catalog_path.exists():
        out.update({"model": None, "dim": None, "images": 0, "texts": 0})
        return out
    with Home.open(settings, create=False) as home:
        out["model"] = home.recorded_model
        out["dim"] = home.dim
        out["images"] = home.catalog.count("image")
        out["texts"] = home.catalog.count("text")
        files = [settings.catalog_path, *settings.home.glob("catalog.sqlite3-*")]
        out["catalog_bytes"] = sum(p.stat().st_size for p in files if p.exists())
        for kind in ("image", "text"):
            path = settings.index_path(kind)
            out[f"{kind}_index_bytes"] = path.stat().st_size if path.exists() else 0
        out["disk_bytes"] = sum(p.stat().st_size for p in settings.home.rglob("*") if p.is_file())
    return out
