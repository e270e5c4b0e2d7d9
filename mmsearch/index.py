"""Index stage: FAISS indexes of image and text vectors, a rebuildable cache.

Each index file travels with a JSON sidecar that says what it holds (kind,
dimension, model, index type, count, and the catalog generation it reflects).
FAISS ids are catalog primary keys. When the sidecar does not match the
catalog, the index is rebuilt from the vectors the catalog keeps.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from mmsearch.errors import IndexCorruptError
from mmsearch.schema import Kind
from mmsearch.store import Catalog

if TYPE_CHECKING:
    from mmsearch.bigindex import VectorFile

#: Index types this module can build. ``flat`` is exact inner product; ``ivf``
#: is an inverted-file index (k-means cells, the ``nprobe`` nearest cells are
#: scanned), its vectors stored as float16. IVF rather than HNSW: IVF removes
#: ids (a deleted or changed file never comes back from a search), adds new
#: vectors without a rebuild, and trains in a minute per million vectors on
#: two cores. A single query is memory-bound (it reads every vector of the
#: scanned cells), so float16 halves both the bytes read and the index's
#: memory. The catalog already keeps vectors as float16 (mmsearch.store), so
#: for them this costs nothing more; float32 vectors of older catalogs move by
#: under 1e-4 of score, and recall@10 was unchanged in bench/query_latency.py. ``ivf-flat`` (float32 vectors, what
#: ``ivf`` built before) stays loadable and buildable for comparison.
#: ``ivfpq`` is the compressed tier for very large collections (mmsearch.bigindex):
#: product-quantised codes rank candidates, which are re-scored with exact vectors.
INDEX_TYPES = ("flat", "ivf", "ivf-flat", "ivfpq")

#: Below this many vectors exact search is kept: ~2 ms at 10k and ~18 ms at 100k per query
#: on 2 quiet cores (360+ ms at 1M), exact results, no training (bench/query_latency.py).
EXACT_MAX = 100_000

#: From this many vectors on, the compressed on-disk index (``ivfpq``) is built:
#: ``ivf`` holds 1 KB of float16 per 512-d vector in memory, 2 GB here, the
#: budget of a search process; ``ivfpq`` holds 64 bytes of codes and maps the
#: exact vectors from disk (docs/scale.md has the measurements).
COMPRESSED_MIN = 2_000_000

#: Vectors sampled per cell to train the IVF cells (faiss warns below 39).
TRAIN_PER_CELL = 40


def choose_index_type(count: int) -> str:
    """The index type for a collection of ``count`` vectors."""
    if count < EXACT_MAX:
        return "flat"
    return "ivf" if count < COMPRESSED_MIN else "ivfpq"


def ivf_cells(count: int) -> int:
    """Number of IVF cells for ``count`` vectors: about 2·sqrt(N), a power of two."""
    target = max(64, 2 * int(np.sqrt(max(count, 1))))
    return 1 << int(round(np.log2(target)))


def ivf_nprobe(nlist: int) -> int:
    """Cells scanned per query (32 of 2048 at a million vectors).

    On CLIP-like synthetic vectors at 1M (bench/query_latency.py --sweep),
    recall@10 of text-like queries, whose neighbours lie across the modality
    gap and spread over cells, was 0.968 at 16 cells, 0.990 at 32 and 0.995
    at 48; image queries 0.990 / 0.998 / 1.000. 32 keeps a margin above 0.95
    for embeddings less kind than the synthetic ones at ~2.5-3 ms a query.
    """
    return max(16, nlist // 64)


def _faiss() -> Any:
    import faiss

    # Batched flat search switches to BLAS above this many queries; BLAS is
    # far faster for batches, and the default threshold (20) is too high.
    faiss.cvar.distance_compute_blas_threshold = 1
    return faiss


def new_faiss_index(dim: int, index_type: str, count: int = 0) -> Any:
    """An empty index; an ``ivf`` one is sized for ``count`` vectors and needs training."""
    faiss = _faiss()
    if index_type == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if index_type == "ivfpq":
        from mmsearch.bigindex import new_compressed_index

        return new_compressed_index(dim, count)
    if index_type in ("ivf", "ivf-flat"):
        nlist = ivf_cells(count)
        # IVF stores ids itself, and its remove_ids is correct; IDMap around it is not
        quantizer = faiss.IndexFlatIP(dim)
        if index_type == "ivf-flat":
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFScalarQuantizer(
                quantizer, dim, nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT,
                False,  # encode the vectors themselves, not residuals: no per-cell term at search time
            )
        index.nprobe = ivf_nprobe(nlist)
        return index
    raise ValueError(f"unknown index type {index_type!r}")


@dataclass
class VectorIndex:
    """A FAISS index of one kind of vector, with what its sidecar says.

    An ``ivfpq`` index also has :attr:`vectors`, the exact vectors its
    searches are re-scored with; one loaded from disk is memory-mapped and
    read into memory only when it is first changed (:attr:`source`).
    """

    kind: Kind
    dim: int
    model: str
    index_type: str
    faiss_index: Any
    generation: int = 0
    vectors: "VectorFile | None" = None
    #: the file a memory-mapped (read-only) FAISS index was mapped from
    source: Path | None = None

    @property
    def count(self) -> int:
        return int(self.faiss_index.ntotal)

    @classmethod
    def empty(cls, kind: Kind, dim: int, model: str, index_type: str = "flat") -> "VectorIndex":
        return cls(kind, dim, model, index_type, new_faiss_index(dim, index_type))

    @property
    def trained(self) -> bool:
        return bool(self.faiss_index.is_trained)

    @property
    def ivf(self) -> Any:
        """The inverted-file part of an ``ivf*`` index (inside the OPQ transform of an ``ivfpq`` one)."""
        if self.index_type == "ivfpq":
            return _faiss().extract_index_ivf(self.faiss_index)
        return self.faiss_index

    def train(self, vectors: np.ndarray) -> None:
        """Fit an IVF index's cells (and codebooks) to a sample of the vectors it will hold."""
        self.faiss_index.train(np.ascontiguousarray(vectors, dtype=np.float32))

    def _writable(self) -> None:
        """Read a memory-mapped index into memory before it is changed (mapped lists cannot grow)."""
        if self.source is not None:
            faiss = _faiss()
            probe = int(self.ivf.nprobe)
            self.faiss_index = faiss.read_index(str(self.source))
            self.ivf.nprobe = probe
            from mmsearch.bigindex import set_quantizer_ef

            set_quantizer_ef(self.ivf)
            self.source = None

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self._writable()
            ids = np.ascontiguousarray(ids, dtype=np.int64)
            vectors = np.ascontiguousarray(vectors, dtype=np.float32)
            self.faiss_index.add_with_ids(vectors, ids)
            if self.vectors is not None:
                self.vectors.write(ids, vectors)

    def remove(self, ids: np.ndarray) -> int:
        if not len(ids):
            return 0
        self._writable()
        return int(self.faiss_index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64)))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)``, each (n_queries, k); missing slots have id -1."""
        k = max(1, min(k, self.count)) if self.count else 1
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if self.vectors is None:
            return self.faiss_index.search(queries, k)
        from mmsearch.bigindex import REFINE_FACTOR, refine

        _, candidates = self.faiss_index.search(queries, min(self.count, k * REFINE_FACTOR))
        return refine(queries, candidates, self.vectors, k)

    def ids(self) -> np.ndarray:
        import faiss

        if not self.index_type.startswith("ivf"):
            return faiss.vector_to_array(self.faiss_index.id_map).astype(np.int64)
        lists = self.ivf.invlists
        parts = [
            faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
            for i in range(lists.nlist)
            if lists.list_size(i)
        ]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    # -- files --------------------------------------------------------------

    def sidecar(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.index_type == "ivfpq":
            from mmsearch.bigindex import REFINE_FACTOR, describe

            extra = describe(self.faiss_index)
            if self.vectors is not None:
                extra["refine"] = {"file": self.vectors.path.name, "dtype": "float16",
                                   "rows": self.vectors.rows, "factor": REFINE_FACTOR}
        elif self.index_type.startswith("ivf"):
            extra = {"nlist": int(self.faiss_index.nlist), "nprobe": int(self.faiss_index.nprobe),
                     "storage": "float16" if hasattr(self.faiss_index, "sq") else "float32"}
        return {
            "kind": self.kind,
            "dim": self.dim,
            "model": self.model,
            "index_type": self.index_type,
            "count": self.count,
            "generation": self.generation,
            **extra,
        }

    def save(self, path: Path) -> None:
        """Write index and sidecar atomically (temp file, fsync, rename); exact vectors first."""
        faiss = _faiss()
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.vectors is not None:
            self.vectors.commit(vectors_path(path))
        _atomic_write(path, lambda tmp: _write_faiss(faiss, self.faiss_index, tmp))
        payload = self.sidecar()
        if self.vectors is not None:
            payload["refine"]["file"] = vectors_path(path).name
        data = json.dumps(payload, indent=2).encode()
        _atomic_write(sidecar_path(path), lambda tmp: Path(tmp).write_bytes(data))

    @classmethod
    def load(cls, path: Path) -> "VectorIndex":
        """Read an index; an ``ivfpq`` one is memory-mapped, with its exact vectors."""
        faiss = _faiss()
        try:
            meta = json.loads(sidecar_path(path).read_text())
            mapped = meta.get("index_type") == "ivfpq"
            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC) if mapped else faiss.read_index(str(path))
        except (OSError, ValueError, RuntimeError) as exc:
            raise IndexCorruptError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
        vi = cls(meta["kind"], int(meta["dim"]), meta["model"], meta["index_type"], index, int(meta["generation"]))
        if mapped:
            from mmsearch.bigindex import VectorFile, set_quantizer_ef

            vi.source = path
            vectors = VectorFile(vectors_path(path), vi.dim)
            rows = int(meta.get("refine", {}).get("rows", -1))
            if rows < 0 or vectors.rows < rows:
                raise IndexCorruptError(
                    f"{vectors.path} holds {vectors.rows} rows of exact vectors, {path.name}'s sidecar says {rows}"
                )
            vi.vectors = vectors
        if "nprobe" in meta:
            vi.ivf.nprobe = int(meta["nprobe"])
            if mapped:
                set_quantizer_ef(vi.ivf)
        if vi.count != int(meta["count"]) or index.d != vi.dim:
            raise IndexCorruptError(f"{path} holds {vi.count} vectors of dim {index.d}, its sidecar says otherwise")
        return vi

    def discard(self) -> None:
        """Drop the temp file of exact vectors of an index that will not be saved."""
        if self.vectors is not None:
            self.vectors.discard()


def vectors_path(path: Path) -> Path:
    """The exact (float16) vectors that refine the ``ivfpq`` index at ``path``."""
    return path.with_name(path.name + ".f16")


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def temp_files(path: Path) -> list[Path]:
    """Temp files of saves of ``path`` (and its sidecar); stale unless a save is in flight."""
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))  # the sidecar's too: .NAME.json.*.tmp


def sidecar_is_current(path: Path, generation: int, dim: int, model: str) -> bool:
    """Whether the sidecar says the index at ``path`` reflects this catalog state (reads only the sidecar)."""
    try:
        meta = json.loads(sidecar_path(path).read_text())
        return path.exists() and (meta["generation"], meta["dim"], meta["model"]) == (generation, dim, model)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _write_faiss(faiss: Any, index: Any, tmp: str) -> None:
    """Write ``index`` to ``tmp`` through a Python file, so a full disk is an ``OSError`` with its errno.

    FAISS's own file writer reports it as a ``RuntimeError`` and then prints
    a second complaint to stderr, past any error handling, as it closes the file.
    """
    with open(tmp, "wb") as fh:
        faiss.write_index(index, faiss.PyCallbackIOWriter(fh.write))


def _atomic_write(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the index from others sharing the home
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_from_catalog(
    catalog: Catalog, kind: Kind, dim: int, model: str, path: Path | None = None
) -> VectorIndex:
    """A fresh index holding exactly the catalog's vectors of ``kind``.

    ``path`` is where it will be saved: an ``ivfpq`` index writes its exact
    vectors to a temp file beside it (in the system temp folder without one).
    """
    count = catalog.count(kind)
    index_type = choose_index_type(count)
    index = VectorIndex(kind, dim, model, index_type, new_faiss_index(dim, index_type, count))
    index.generation = catalog.generation(kind)
    if index_type == "ivfpq":
        from mmsearch.bigindex import VectorFile

        final = vectors_path(path) if path is not None else Path(tempfile.gettempdir()) / f"{kind}s.faiss.f16"
        index.vectors = VectorFile.create(final, dim)
    if not index.trained:
        all_ids = catalog.ids(kind)
        if index_type == "ivfpq":
            from mmsearch.bigindex import train_size

            sample_size = min(len(all_ids), train_size(count, dim))
        else:
            sample_size = min(len(all_ids), TRAIN_PER_CELL * int(index.faiss_index.nlist))
        sample = np.sort(np.random.default_rng(0).choice(all_ids, sample_size, replace=False))
        by_id = catalog.vectors(kind, sample.tolist(), dim)
        index.train(np.stack([by_id[int(i)] for i in sample if int(i) in by_id]))
    for ids, vectors in catalog.iter_vectors(kind, dim):
        index.add(ids, vectors)
    return index


def fits(index: VectorIndex, count: int) -> bool:
    """Whether ``index`` still suits a collection of ``count`` vectors.

    Flat turns into IVF past :data:`EXACT_MAX`, IVF into the compressed
    ``ivfpq`` past :data:`COMPRESSED_MIN`; an IVF index is kept while the
    collection stays within a factor 4 of what its cells were sized for (new
    vectors are added to it, not rebuilt), and an ``ivfpq`` one down to half
    its threshold, so switching back and forth near a threshold cannot make
    every run rebuild.
    """
    if index.index_type == "flat":
        return choose_index_type(count) == "flat"
    nlist = int(index.ivf.nlist)
    if index.index_type == "ivfpq":
        from mmsearch.bigindex import cells

        return count >= COMPRESSED_MIN // 2 and cells(count, index.dim) <= 2 * nlist
    return EXACT_MAX // 2 <= count < COMPRESSED_MIN and ivf_cells(count) <= 2 * nlist


def open_index(
    catalog: Catalog,
    path: Path,
    kind: Kind,
    dim: int,
    model: str,
    on_rebuild: Callable[[VectorIndex], None] | None = None,
) -> VectorIndex:
    """The index at ``path`` if it reflects the catalog now, else one rebuilt.

    A rebuilt index is handed to ``on_rebuild`` (which decides whether it is
    safe to save it), or saved to ``path`` when none is given.
    """
    generation = catalog.generation(kind)
    if path.exists() and sidecar_path(path).exists():
        try:
            index = VectorIndex.load(path)
        except IndexCorruptError:
            index = None
        if (
            index is not None
            and index.generation == generation
            and index.dim == dim
            and index.model == model
            and fits(index, index.count)
        ):
            return index
    index = build_from_catalog(catalog, kind, dim, model, path)
    if on_rebuild is None:
        index.save(path)
    else:
        on_rebuild(index)
    return index
