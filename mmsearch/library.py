"""The library: one long-lived object over a home, which every front end holds.

A :class:`Library` opens a home once and keeps what is costly to make: the
encoder, the FAISS index of each kind and the re-ranker. Before each search
it reads the catalog's generation (one small query) and reloads an index only
when another process (or this one) has committed a change since, so a server
started before an ``mmsearch index`` run sees its new images without a
restart. Searches from many threads at once are safe (no call changes the
shared model, see :mod:`mmsearch.towers`), and a writer may index at the
same time, in this process or another.

Nothing here changes process-wide state (thread counts, logging, offline
policy): front ends set those once at start-up. Errors are
:class:`~mmsearch.errors.MmsearchError` subclasses that say what is wrong in
terms of this API; the CLI adds its flag names.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmsearch.errors import UsageError
from mmsearch.settings import Settings, resolve
from mmsearch.schema import Kind

if TYPE_CHECKING:
    from mmsearch.encode import Encoder
    from mmsearch.home import Home
    from mmsearch.index import VectorIndex
    from mmsearch.indexer import IndexReport
    from mmsearch.query import Hit, ImageInput

#: ``progress(done, total)``, called as work advances (the CLI draws a bar with it).
Progress = Callable[[int, int], None]

#: The most results one API search may ask for.
MAX_K = 1000


@dataclass
class _Cached:
    index: "VectorIndex"
    generation: int


class Library:
    """A home held open: search it, index into it, read its images by id.

    Open with :meth:`open`; close with :meth:`close` (or use ``with``).
    """

    def __init__(self, home: "Home"):
        self._home = home
        self._load_lock = threading.Lock()  # loading the encoder
        self._index_locks: dict[Kind, threading.Lock] = {"image": threading.Lock(), "text": threading.Lock()}
        self._indexes: dict[Kind, _Cached] = {}
        #: homes held before a ``reindex`` switched the model; closed with the library, as a
        #: search that began before the switch may still be reading through one
        self._retired: list["Home"] = []

    @classmethod
    def open(
        cls,
        home: str | Path | Settings | None = None,
        model: str | None = None,
        *,
        device: str | None = None,
        int8: bool | None = None,
        text_precision: str | None = None,
        create: bool = True,
        before_model_load: Callable[[Any], None] | None = None,
    ) -> "Library":
        """Open the home at ``home`` (a folder, or resolved :class:`Settings`).

        ``model`` is a model spec; ``None`` means the one the home was built
        with. Nothing is loaded until it is needed (see :meth:`warm`).
        ``create=False`` fails on a home that holds no catalog yet.
        ``before_model_load(spec)`` runs once, just before the model loads: the
        place for a front end's process set-up (see :mod:`mmsearch.runtime`).
        """
        from mmsearch.home import Home

        if isinstance(home, Settings):
            settings = home
        else:
            settings = resolve(
                home=Path(home) if home is not None else None, model=model, device=device, int8=int8,
                text_precision=text_precision,
            )
        home_ = Home.open(settings, create=create)
        home_.before_model_load = before_model_load
        return cls(home_)

    def close(self) -> None:
        for home in self._retired:
            home.close()
        self._home.close()

    def __enter__(self) -> "Library":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what it holds ---------------------------------------------------------

    @property
    def settings(self) -> Settings:
        return self._home.settings

    @property
    def home(self) -> "Home":
        """The underlying home (catalog, paths); for front ends that need its files."""
        return self._home

    @property
    def model(self) -> str:
        """The canonical spec of the model this library searches with."""
        return self._home.spec.canonical

    def status(self) -> dict[str, object]:
        """What the home holds: counts, model, sizes on disk (``mmsearch status --json``)."""
        from mmsearch.home import status

        return status(self.settings)

    def count(self, kind: Kind) -> int:
        return self._home.catalog.count(kind)

    def has_reranker(self) -> bool:
        """Whether the model comes with a cross-attention re-ranker (without loading it)."""
        from mmsearch.rerank import spec_has_reranker

        return spec_has_reranker(self._home.spec)

    def encoder(self) -> "Encoder":
        """The encoder, loaded once."""
        with self._load_lock:
            return self._home.encoder()

    def warm(self) -> None:
        """Load the encoder, the indexes and the re-ranker now, so the first search is fast."""
        encoder = self.encoder()
        for kind in ("image", "text"):
            if self.count(kind):
                self.index(kind)
        if self.has_reranker():
            from mmsearch.rerank import Reranker

            Reranker.load(encoder)

    def index(self, kind: Kind) -> "VectorIndex":
        """The FAISS index of ``kind``, reloaded when the catalog has changed since it was read.

        While one thread reloads, others keep searching the index they have
        (it held every row that was committed when it was read). After a
        ``reindex`` switched the home's model, the library takes up the new
        model (the home is opened again; a library opened with the old model
        named explicitly gets :class:`~mmsearch.errors.ModelMismatchError`).
        """
        from mmsearch.errors import ModelChangedError

        try:
            return self._index(kind)
        except ModelChangedError:
            self._reopen()
            return self._index(kind)

    def _reopen(self) -> None:
        """Open the home again, on the model a ``reindex`` switched it to; its encoder loads when first used."""
        from mmsearch.errors import ModelChangedError
        from mmsearch.home import Home

        with self._load_lock:
            old = self._home
            try:
                old.check_model_unchanged()
                return  # another thread has opened it again already
            except ModelChangedError:
                pass
            home = Home.open(old.settings, create=False)
            home.before_model_load = old.before_model_load
            self._indexes = {}
            self._retired.append(old)
            self._home = home

    def _index(self, kind: Kind) -> "VectorIndex":
        generation = self._home.catalog.generation(kind)
        cached = self._indexes.get(kind)
        if cached is not None and cached.generation == generation:
            return cached.index
        lock = self._index_locks[kind]
        if cached is not None and not lock.acquire(blocking=False):
            return cached.index
        if cached is None:
            lock.acquire()
        try:
            cached = self._indexes.get(kind)
            generation = self._home.catalog.generation(kind)
            if cached is None or cached.generation != generation:
                index = self._home.index(kind)
                self._indexes[kind] = cached = _Cached(index, index.generation)
            return cached.index
        finally:
            lock.release()

    # -- search ----------------------------------------------------------------

    def search(
        self,
        query: str | None = None,
        *,
        image: "ImageInput | None" = None,
        target: Kind = "image",
        k: int = 10,
        rerank_k: int = 0,
        files: bool = True,
        on_warning: Callable[[str], None] | None = None,
        cutoff: float | None = None,
    ) -> list["Hit"]:
        """The ``k`` best images (``target="image"``) or texts for a text query and/or an example image.

        ``image`` is a path, the bytes of a file, or a PIL picture. A query term
        that names an image file stands for that image unless ``files=False``
        (what a server passes: it never opens a path a client names).
        ``rerank_k`` > 0 re-scores that many candidates with the re-ranker.
        ``on_warning`` hears of query text cut to the model's context.
        Every hit has a calibrated ``relevance``; ``cutoff`` leaves out those
        below it (:mod:`mmsearch.relevance`).
        """
        from mmsearch.search import search

        self._check_k(k)
        if rerank_k < 0:
            raise UsageError(f"rerank_k must be 0 or more, got {rerank_k}")
        index = self.index(target) if self.count(target) else None
        return search(
            self._home, query, image=image, target=target, k=k, rerank_k=rerank_k, files=files,
            index=index, on_warning=on_warning, cutoff=cutoff,
        )

    def similar(self, image_id: int, k: int = 10) -> list["Hit"]:
        """Images like the catalogued image ``image_id`` (found by its stored vector; it comes first)."""
        from mmsearch.errors import InputFileError
        from mmsearch.search import nearest

        self._check_k(k)
        index = self.index("image")  # first: it takes up a model a reindex switched to
        dim = self._home.dim
        vector = self._home.catalog.vectors("image", [int(image_id)], dim).get(int(image_id)) if dim else None
        if vector is None:
            raise InputFileError(f"no image with id {image_id} in the catalog")
        return nearest(self._home, vector, "image", k, index=index)

    @staticmethod
    def _check_k(k: int) -> None:
        if k < 1:
            raise UsageError(f"k must be at least 1, got {k}")

    # -- images by id ------------------------------------------------------------

    def image_file(self, image_id: int) -> tuple[str, str] | None:
        """``(path, content hash)`` of a live catalogued image: in the catalog and still a file."""
        ids = [int(image_id)]
        path = self._home.catalog.image_paths(ids).get(ids[0])
        if path is None or not os.path.isfile(path):
            return None
        digest = self._home.catalog.image_hashes(ids).get(ids[0])
        return (path, digest) if digest else None

    # -- writing -----------------------------------------------------------------

    def add_images(
        self,
        paths: Sequence[str | Path],
        *,
        progress: Progress | None = None,
        on_skip: Callable[[str, str], None] | None = None,
        on_lanes: Callable[[int], None] | None = None,
        ray: bool = False,
    ) -> "IndexReport":
        """Index every image under ``paths`` (folders or files); searches may run meanwhile.

        ``on_lanes(n)``: called before ``n`` CPU lanes start encoding, for a front
        end that shares the cores between them (:func:`mmsearch.runtime.threads_for_lanes`).
        ``ray``: decode and encode on the Ray cluster this process is connected to
        (``ray.init``, or :func:`mmsearch.raypipe.connected`); the files must be at
        the same path on every node. Planning and the catalog writes stay here.
        """
        from mmsearch.indexer import index_paths

        if not ray:
            self.encoder()  # loaded here to answer searches; a Ray run encodes in the actors
        return index_paths(self._home, paths, progress=progress or False, on_skip=on_skip, on_lanes=on_lanes,
                           ray=ray)

    def add_texts(
        self,
        source: str | Path | Sequence[str],
        *,
        progress: Progress | None = None,
        on_warning: Callable[[str], None] | None = None,
    ) -> Any:
        """Add texts: a corpus file (.txt, .jsonl, .csv), or a list of strings.

        A string's id comes from its content (``text#HASH``), so adding the
        same strings again changes nothing and another list never replaces them.
        """
        from mmsearch.texts import add_texts, text_key

        if isinstance(source, (str, Path)):
            file = Path(source)
            return add_texts(self._home, file, progress=progress or False, on_warning=on_warning)
        import json
        import tempfile

        with tempfile.TemporaryDirectory(prefix="mmsearch-texts-") as tmp:
            file = Path(tmp) / "texts.jsonl"
            file.write_text(
                "".join(
                    json.dumps({"id": text_key("text", t), "text": t}, ensure_ascii=False) + "\n" for t in source
                )
            )
            return add_texts(self._home, file, progress=progress or False, on_warning=on_warning)
