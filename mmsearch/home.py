"""A home: one catalog, its FAISS indexes, and the model that made their vectors."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmsearch import modelid, modelspec
from mmsearch.errors import (
    CatalogError,
    HomeLockedError,
    HomeWriteError,
    ModelChangedError,
    ModelMismatchError,
    ModelUnavailableError,
)
from mmsearch.settings import DEFAULT_MODEL, Settings
from mmsearch.schema import KINDS, Kind
from mmsearch.sqlite_backend import READ_ONLY_ERRNOS, read_only_error
from mmsearch.store import Catalog, catalog_exists

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
        #: Values derived from the catalog that a long-lived holder keeps between
        #: queries, each stored with the generation it was derived from.
        self.derived: dict[tuple[str, str], tuple[int, Any]] = {}
        #: the model's spec as the home's files (index sidecars) name it, where that is
        #: not :attr:`spec` (a moved model on a home that cannot be written)
        self._label: str | None = None
        #: how many times the home has switched models (``reindex``) when it was opened
        self.model_generation = self._model_generation()
        self.spec = self._resolve_spec()

    @classmethod
    def open(cls, settings: Settings, *, create: bool = True) -> "Home":
        catalog = Catalog.open(catalog_location(settings), create=create)
        if settings.catalog_on_server:
            try:  # the folder of the index cache and locks (a SQLite catalog's open makes it)
                settings.home.mkdir(parents=True, exist_ok=True)
            except OSError:
                pass  # as on read-only media: indexes stay in memory; a writer's lock says why it cannot
        try:
            home = cls(settings, catalog)
            home._bind_index_cache()
            return home
        except BaseException:
            catalog.close()
            raise

    def _bind_index_cache(self) -> None:
        """Make the home's FAISS files a cache of *this* catalog.

        A sidecar says which generation of a catalog an index reflects, not
        which catalog: a home pointed at another one (``--catalog``, or back to
        its own file) could find the same generation there. The catalog gets
        an id (meta ``catalog_id``), the home remembers the id its indexes were
        built from (``catalog-id``), and a home that finds another one drops
        their sidecars, so they are rebuilt from the catalog. A SQLite home that
        remembers none (made before) keeps its indexes: they can only be its own.
        """
        if self.catalog.readonly:
            return
        ident = self.catalog.get_meta("catalog_id")
        if ident is None:
            import uuid

            ident = uuid.uuid4().hex
            self._try_set_meta({"catalog_id": ident})
            ident = self.catalog.get_meta("catalog_id") or ident  # another process may have set it first
        marker = self.settings.home / "catalog-id"
        try:
            known = marker.read_text().strip() if marker.exists() else None
            if known == ident:
                return
            if known is not None or self.settings.catalog_on_server:
                from mmsearch.index import sidecar_path

                with self.save_lock():
                    for kind in KINDS:
                        sidecar_path(self.settings.index_path(kind)).unlink(missing_ok=True)
            marker.write_text(ident + "\n")
        except OSError:
            pass  # a home that cannot be written: its searches rebuild in memory when the sidecar lags

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
        """The dimension of the home's vectors; :class:`ModelChangedError` once a ``reindex`` has
        switched the model under this open home (its vectors are then another model's)."""
        raw = self.catalog.get_meta("dim")
        self.check_model_unchanged()
        return int(raw) if raw else None

    @property
    def model_label(self) -> str:
        """The model's name in the home's index sidecars: the recorded spec, or the one in use."""
        return self._label or self.spec.canonical

    def _model_generation(self) -> int:
        return int(self.catalog.get_meta("model_generation") or 0)

    def check_model_unchanged(self) -> None:
        """Raise :class:`ModelChangedError` if a ``reindex`` switched the home's model since it was opened:
        its vectors are then another model's, of which this home's encoder knows nothing."""
        if self._model_generation() != self.model_generation:
            raise ModelChangedError(
                f"{self.settings.home} switched to model {self.recorded_model} while this command ran; run it again"
            )

    def uses_model(self, spec: modelspec.ModelSpec) -> bool:
        """Whether the home's vectors were made by ``spec`` (also a copy of its local model elsewhere)."""
        recorded = self.recorded_model
        if recorded is None:
            return False
        if spec.canonical == recorded:
            return True
        try:
            return self._is_same_model(modelspec.parse(recorded), spec)
        except ModelMismatchError:  # the recorded model is gone and was never hashed: not provably the same
            return False

    def _resolve_spec(self) -> modelspec.ModelSpec:
        recorded = self.recorded_model
        if self.settings.model is None:
            spec = modelspec.parse(recorded or DEFAULT_MODEL)
            if recorded is not None:
                self._remember_identity(spec)
            return spec
        asked = modelspec.parse(self.settings.model)
        if recorded is None or asked.canonical == recorded:
            if recorded is not None:
                self._remember_identity(asked)
            return asked
        if self._is_same_model(modelspec.parse(recorded), asked):
            self._record_move(recorded, asked)
            return asked
        raise ModelMismatchError(
            f"{self.settings.home} was indexed with model {recorded}, not {asked.canonical}; "
            f"drop --model to use {recorded}, or pass --home DIR for a separate index, "
            f"or run `mmsearch --model {shlex.quote(asked.canonical)} reindex` to switch this home to it"
        )

    # A local model is known by the hash of its files (mmsearch.modelid), recorded in the
    # meta table as ``model_hash``; ``model_stamp`` holds the path, size and mtime of the
    # files it was computed from, so an unchanged model is not read again on every open.

    def _remember_identity(self, spec: modelspec.ModelSpec) -> None:
        """Record the hash of the home's own local model, where it is missing or its files changed."""
        files = modelid.model_files(spec)
        if files is None or self.catalog.readonly:
            return
        stamp = modelid.stamp(files)
        if self.catalog.get_meta("model_stamp") == stamp and self.catalog.get_meta("model_hash"):
            return
        self._try_set_meta({"model_hash": modelid.fingerprint(spec, files), "model_stamp": stamp})

    def _try_set_meta(self, values: dict[str, str]) -> None:
        """Record facts a later open can work out again: a full disk must not stop a reader for them."""
        try:
            self.catalog.set_meta(values)
        except CatalogError:
            pass

    def _is_same_model(self, recorded: modelspec.ModelSpec, asked: modelspec.ModelSpec) -> bool:
        """Whether ``asked`` is the home's local model at another path (same files, same hash)."""
        if not (modelid.is_local(recorded) and modelid.is_local(asked)):
            return False
        files = modelid.model_files(asked)
        if files is None:
            return False
        known = self.catalog.get_meta("model_hash")
        if known is None:  # a home made before hashes were recorded
            old_files = modelid.model_files(recorded)
            if old_files is None:
                raise ModelMismatchError(
                    f"{self.settings.home} was indexed with model {recorded}, which is not there any more, "
                    f"and the home has no record of its contents to recognise it by; if {asked.path} is that "
                    f"model moved, link it there once (ln -s {shlex.quote(str(asked.path))} "
                    f"{shlex.quote(str(recorded.path))}) and run "
                    f"`mmsearch --home {shlex.quote(str(self.settings.home))} --model {shlex.quote(str(asked.path))} status`"
                )
            known = modelid.fingerprint(recorded, old_files)
            if not self.catalog.readonly:
                self._try_set_meta({"model_hash": known, "model_stamp": modelid.stamp(old_files)})
        return modelid.fingerprint(asked, files) == known

    def _record_move(self, recorded: str, asked: modelspec.ModelSpec) -> None:
        """Make the home name its model by its new path: the meta table and the files that name it.

        The files go first: a run killed in between finds the meta table still
        naming the old path and does it again. A home that cannot be written, or
        that a writer holds, keeps the old name and uses the new path in memory.
        """
        files = modelid.model_files(asked)
        if self.catalog.readonly or files is None:
            self._label = recorded
            return
        try:
            with self.write_lock():
                for path in self._files_naming_model():
                    _rename_model_in(path, recorded, asked.canonical)
                self.catalog.set_meta({"model": asked.canonical, "model_stamp": modelid.stamp(files)})
        except (HomeLockedError, HomeWriteError, CatalogError):
            self._label = recorded

    def _files_naming_model(self) -> list[Path]:
        """The JSON files of the home that record its model's spec in their ``model`` field:
        the index sidecars and the re-ranker token store's header (mmsearch.rerank)."""
        from mmsearch.index import sidecar_path

        home = self.settings.home
        return [*(sidecar_path(self.settings.index_path(kind)) for kind in KINDS), home / "rerank" / "tokens.json"]

    def encoder(self) -> "Encoder":
        """The home's encoder, loaded on first use; records the model in a new home."""
        if self._encoder is None:
            from mmsearch.encode import load_encoder

            path = self.spec.path
            if self.recorded_model is not None and path is not None and not path.exists():
                raise ModelUnavailableError(
                    f"the model of {self.settings.home}, {self.spec}, is not there any more; "
                    "if you moved it, pass --model NEWPATH (a copy of the same model is recognised)"
                )
            if self.before_model_load is not None:
                self.before_model_load(self.spec)
            encoder = load_encoder(
                self.spec, self.settings.device, int8=self.settings.int8,
                text_precision=self.settings.text_precision,
            )
            dim = self.dim
            if dim is not None and dim != encoder.dim:
                raise ModelMismatchError(
                    f"model {self.spec} makes {encoder.dim}-d vectors, but {self.settings.home} holds {dim}-d ones"
                )
            if self.recorded_model is None:
                meta = {"model": self.spec.canonical, "dim": str(encoder.dim)}
                files = modelid.model_files(self.spec)
                if files is not None:
                    meta.update(model_hash=modelid.fingerprint(self.spec, files), model_stamp=modelid.stamp(files))
                self.catalog.set_meta(meta)
            self._encoder = encoder
        return self._encoder

    # -- indexes ------------------------------------------------------------

    def index(self, kind: Kind) -> "VectorIndex":
        """The FAISS index of ``kind``, rebuilt from the catalog if it is stale."""
        from mmsearch.index import VectorIndex, open_index

        dim = self.dim
        if dim is None:
            return VectorIndex.empty(kind, 1, self.model_label)
        return open_index(
            self.catalog, self.settings.index_path(kind), kind, dim, self.model_label,
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
        if dim is not None and not sidecar_is_current(path, self.catalog.generation(kind), dim, self.model_label):
            self.index(kind)

    def _save(self, index: "VectorIndex") -> None:
        """Save under the save lock; temp files of saves killed midway are removed first."""
        from mmsearch.index import temp_files

        path = self.settings.index_path(index.kind)
        in_use = index.vectors.path if index.vectors is not None else None  # a rebuild's exact vectors
        try:
            for stale in temp_files(path):  # no other save is in flight: we hold the save lock
                if stale != in_use:
                    stale.unlink(missing_ok=True)
            index.save(path)
        except (OSError, RuntimeError) as exc:  # RuntimeError: FAISS's own write errors
            raise self._cannot_write(
                path, exc, "the catalog keeps every vector, and the index is rebuilt from it on the next run"
            ) from None

    def _cannot_write(self, path: Path, exc: BaseException, kept: str = "nothing was changed") -> HomeWriteError:
        """The one line for a failed write of ``path``: what failed, why, and what is kept."""
        if isinstance(exc, OSError) and exc.errno in READ_ONLY_ERRNOS:
            return read_only_error(self.settings.home)
        return HomeWriteError(f"cannot write {path}: {write_failure(exc)}; {kept}")

    def _save_rebuilt(self, index: "VectorIndex") -> None:
        """Save an index rebuilt from the catalog, if it is still current.

        Readers (``search``) rebuild too, possibly while a writer runs. The
        index file and its sidecar are two renames, so every save holds the
        save lock (never a reader+writer mix of the two files), and a rebuild
        that a writer's commit has since outdated is not saved at all. A home
        we cannot write to (read-only media, a full disk) keeps the rebuild in memory.
        """
        if self.catalog.readonly:
            return
        try:
            with self.save_lock():
                if self.catalog.generation(index.kind) == index.generation:
                    self._save(index)
        except (OSError, HomeWriteError):
            pass
        # kept in memory only: an ivfpq rebuild's temp file of exact vectors stays open
        # for its searches and is removed when the index is dropped (mmsearch.bigindex.VectorFile)

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
        """Only one writer per home, and per catalog (homes on other machines may share a
        catalog on a server); a second one fails at once with a clear message."""
        path: Path = self.settings.lock_path
        if self.catalog.readonly:
            raise read_only_error(self.settings.home)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise self._cannot_write(path, exc) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
                raise HomeLockedError(
                    f"{self.settings.home} is being written by pid {holder}; wait for it to finish"
                ) from None
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
            except OSError:
                pass  # a full disk: the lock holds without the pid, and the write that matters fails with its own line
            with self.catalog.writer_lock():
                yield
        finally:
            os.close(fd)


def write_failure(exc: BaseException) -> str:
    """Why a write failed, in a few words: the OS's reason (FAISS puts it in brackets at the end)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip()
    found = re.search(r"\(([^()]+)\)$", text)
    if found:
        return found.group(1)
    return text.splitlines()[0] if text else type(exc).__name__


def _rename_model_in(path: Path, old: str, new: str) -> None:
    """Rewrite a JSON file whose ``model`` is ``old`` to say ``new`` (atomically, as index saves do)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # absent or unreadable: whoever reads it next rebuilds it
    if not isinstance(data, dict) or data.get("model") != old:
        return
    data["model"] = new
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(data, indent=2))
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        raise HomeWriteError(f"cannot write {path}: {write_failure(exc)}; nothing was changed") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def catalog_location(settings: Settings) -> Path | str:
    """Where the home's catalog is: the URL of a server's database, else the home's SQLite file."""
    return settings.catalog if settings.catalog is not None else settings.catalog_path


def status(settings: Settings) -> dict[str, object]:
    """What a home holds: counts, model, sizes on disk, and where its catalog is (never a password)."""
    from mmsearch.settings import url_without_password

    where = catalog_location(settings)
    exists = catalog_exists(where)
    out: dict[str, object] = {
        "home": str(settings.home), "exists": exists,
        "catalog_backend": "postgresql" if settings.catalog_on_server else "sqlite",
        "catalog_url": url_without_password(settings.catalog) if settings.catalog else f"sqlite:///{where}",
    }
    if not exists:
        out.update({"model": None, "dim": None, "images": 0, "texts": 0})
        return out
    with Home.open(settings, create=False) as home:
        out["model"] = home.recorded_model
        out["dim"] = home.dim
        out["images"] = home.catalog.count("image")
        out["texts"] = home.catalog.count("text")
        from mmsearch.staging import Staging

        staging = Staging(home.catalog)
        target = staging.target()
        if target:  # a reindex that has not finished: what it has made so far
            out["reindex"] = {"model": target.get("reindex_model"), "staged": staging.count()}
        out["catalog_bytes"] = home.catalog.backend.size_bytes()
        for kind in ("image", "text"):
            path = settings.index_path(kind)
            out[f"{kind}_index_bytes"] = path.stat().st_size if path.exists() else 0
        out["disk_bytes"] = sum(p.stat().st_size for p in settings.home.rglob("*") if p.is_file())
    return out
