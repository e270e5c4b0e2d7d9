"""The compressed index for very large collections, and the exact vectors that refine it.

Past :data:`mmsearch.index.COMPRESSED_MIN` vectors the index is an inverted
file of product-quantised codes: an OPQ rotation, IVF cells found through an
HNSW graph of their centroids (assignment of a new vector or a query costs a
few hundred distance computations, not one per cell), and ``m`` one-byte
codes per vector (64 bytes for a 512-d vector instead of 1 KB as float16).
Those codes only rank candidates; the final top k is re-scored with the
catalog's own float16 vectors, kept in a memory-mapped file next to the index
(:class:`VectorFile`, one row per catalog id, rebuildable from the catalog).

A search process maps both files rather than reading them (the index file is
read with ``IO_FLAG_MMAP_IFC``), so its resident memory is the pages queries
touch, which the kernel can drop again, not the size of the collection.

This module knows FAISS and numpy only; :mod:`mmsearch.index` wires it into
:class:`~mmsearch.index.VectorIndex`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

#: Bytes of float32 training vectors held at once: the sample that fits the
#: cells, the rotation and the codebooks is capped at this.
TRAIN_BUDGET_BYTES = 512 * 1024 * 1024

#: Candidates taken from the codes per result wanted; they are re-scored exactly
#: (text-like queries need 20 for recall@10 above 0.95 at 1M, docs/scale.md).
REFINE_FACTOR = 20

#: k-means wants at least this many training points per centroid (FAISS warns below).
MIN_POINTS_PER_CENTROID = 39

#: Alternations of rotation and codebooks when OPQ is trained.
OPQ_ITERATIONS = 8

#: Neighbours per node of the HNSW graph over the cell centroids.
HNSW_M = 32


def _pow2(x: float) -> int:
    return 1 << max(0, int(round(np.log2(max(x, 1.0)))))


def train_size(count: int, dim: int) -> int:
    """How many vectors to train on: ~40 per cell, within :data:`TRAIN_BUDGET_BYTES`."""
    by_budget = TRAIN_BUDGET_BYTES // (4 * dim)
    return int(min(count, 40 * _pow2(np.sqrt(max(count, 1))), by_budget))


def cells(count: int, dim: int) -> int:
    """IVF cells: about sqrt(N) (a power of two), no more than the training sample can fit."""
    fit = train_size(count, dim) // MIN_POINTS_PER_CENTROID
    return max(1, min(_pow2(np.sqrt(max(count, 1))), 1 << int(np.log2(max(fit, 1)))))


def nprobe(nlist: int) -> int:
    """Cells scanned per query."""
    return max(1, min(nlist, max(16, nlist // 64)))


def subquantizers(dim: int) -> int:
    """PQ sub-vectors: one per 8 dimensions (64 for 512-d), a divisor of ``dim``."""
    m = max(1, dim // 8)
    while dim % m:
        m -= 1
    return m


def code_bits(count: int, dim: int) -> int:
    """Bits per PQ code: 8, or fewer when the sample is too small to fit 256 centroids."""
    fit = train_size(count, dim) // MIN_POINTS_PER_CENTROID
    return int(max(1, min(8, np.log2(max(fit, 2)))))


def new_compressed_index(dim: int, count: int) -> Any:
    """An empty, untrained OPQ + IVF(HNSW) + PQ index sized for ``count`` vectors.

    OPQ needs 256-centroid codebooks of its own, so it is left out when the
    training sample is too small for them (small test collections).
    """
    import faiss

    nlist = cells(count, dim)
    m = subquantizers(dim)
    bits = code_bits(count, dim)
    opq = bits == 8
    spec = f"{'OPQ%d,' % m if opq else ''}IVF{nlist}_HNSW{HNSW_M},PQ{m}x{bits}"
    index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    if opq:
        rotation = faiss.downcast_VectorTransform(index.chain.at(0))
        # each OPQ iteration trains m codebooks again; FAISS's 50 (+40 for the first)
        # cost more than the whole rest of the build on two cores
        rotation.niter, rotation.niter_pq_0 = OPQ_ITERATIONS, OPQ_ITERATIONS
    ivf = faiss.extract_index_ivf(index)
    faiss.downcast_index(ivf).do_polysemous_training = False  # the factory's default; it trains Hamming codes we never search
    ivf.nprobe = nprobe(nlist)
    set_quantizer_ef(ivf)
    return index


def set_quantizer_ef(ivf: Any) -> None:
    """Let the HNSW graph over the centroids look wide enough to find the ``nprobe`` nearest cells."""
    import faiss

    quantizer = faiss.downcast_index(ivf.quantizer)
    if hasattr(quantizer, "hnsw"):
        quantizer.hnsw.efSearch = max(64, 2 * int(ivf.nprobe))


def describe(index: Any) -> dict[str, Any]:
    """What a compressed index holds, for its sidecar."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    pq = faiss.downcast_index(ivf).pq
    return {
        "nlist": int(ivf.nlist),
        "nprobe": int(ivf.nprobe),
        "storage": f"pq{int(pq.M)}x{int(pq.nbits)}",
        "opq": isinstance(index, faiss.IndexPreTransform),
        "quantizer": type(faiss.downcast_index(ivf.quantizer)).__name__,
    }


class VectorFile:
    """Float16 vectors by catalog id in a memory-mapped file: row ``id`` holds the vector of ``id``.

    Rows of ids that were removed keep their old values (the index no longer
    returns those ids); rows never written are zeros. A file made for a
    rebuild starts as a temp file and becomes ``path`` in :meth:`commit`, so
    a reader never sees one half written.
    """

    def __init__(self, path: Path, dim: int, *, temp: bool = False, writable: bool = False):
        self.path = path
        self.dim = dim
        self.temp = temp
        self._writable = writable
        self._map: np.ndarray | None = None
        self._map_rows = -1
        self._used = 0  # rows written through this object

    @property
    def row_bytes(self) -> int:
        return 2 * self.dim

    @property
    def rows(self) -> int:
        try:
            return os.path.getsize(self.path) // self.row_bytes
        except OSError:
            return 0

    @classmethod
    def create(cls, final: Path, dim: int) -> "VectorFile":
        """A new, empty temp file next to ``final``, or in the system temp folder where that is not writable."""
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        except OSError:
            fd, tmp = tempfile.mkstemp(prefix="mmsearch-vectors.", suffix=".tmp")
        os.fchmod(fd, 0o644)
        os.close(fd)
        return cls(Path(tmp), dim, temp=True, writable=True)

    def _mapped(self, rows_needed: int = 0) -> np.ndarray:
        rows = self.rows
        if self._writable and rows_needed > rows:
            rows = max(rows_needed, rows + rows // 4)  # grow by a quarter: no remap per batch
            self._map = None
            with open(self.path, "r+b") as fh:
                fh.truncate(rows * self.row_bytes)
        if self._map is None or self._map_rows != rows:
            self._map = (
                np.memmap(self.path, dtype=np.float16, mode="r+" if self._writable else "r", shape=(rows, self.dim))
                if rows else np.zeros((0, self.dim), dtype=np.float16)
            )
            self._map_rows = rows
        return self._map

    def write(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Store ``vectors`` at rows ``ids`` (the file grows as needed)."""
        if not len(ids):
            return
        if not self._writable:
            self._writable, self._map = True, None
        ids = np.asarray(ids, dtype=np.int64)
        self._used = max(self._used, int(ids.max()) + 1)
        target = self._mapped(self._used)
        target[ids] = np.asarray(vectors, dtype=np.float16)

    def read(self, ids: np.ndarray) -> np.ndarray:
        """float32 vectors of ``ids`` (any shape); ids outside the file (or -1) read as zeros.

        Rows are read with ``pread``, not through the mapping: a search touches
        a few hundred scattered rows, and mapped pages would stay in the
        process's resident memory until it held most of the file.
        """
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.ravel()
        out = np.zeros((len(flat), self.dim), dtype=np.float16)
        rows = self.rows
        ok = np.flatnonzero((flat >= 0) & (flat < rows))
        if len(ok):
            if isinstance(self._map, np.memmap) and self._writable:
                self._map.flush()
            size = self.row_bytes
            fd = os.open(self.path, os.O_RDONLY)
            try:
                view = out.view(np.uint8).reshape(len(flat), size)
                first, last = int(flat[ok[0]]), int(flat[ok[-1]])
                if len(ok) == len(flat) and last - first + 1 == len(flat) and (np.diff(flat) == 1).all():
                    view[:] = np.frombuffer(os.pread(fd, size * len(flat), first * size),
                                            dtype=np.uint8).reshape(len(flat), size)  # one run of rows
                else:
                    for i in ok:
                        view[i] = np.frombuffer(os.pread(fd, size, int(flat[i]) * size), dtype=np.uint8)
            finally:
                os.close(fd)
        return out.astype(np.float32).reshape(*ids.shape, self.dim)

    def commit(self, final: Path) -> None:
        """Make the rows durable; a temp file then replaces ``final``."""
        if isinstance(self._map, np.memmap):
            self._map.flush()
        if not self.temp:
            if self._writable and self.path.exists():
                with open(self.path, "rb+") as fh:
                    os.fsync(fh.fileno())
            return
        self._map = None
        with open(self.path, "rb+") as fh:
            fh.truncate(self._used * self.row_bytes)  # no growth slack in a new file
            os.fsync(fh.fileno())
        os.replace(self.path, final)
        self.path, self.temp = final, False

    def discard(self) -> None:
        """Remove a temp file that will not be committed."""
        self._map = None
        if self.temp:
            self.path.unlink(missing_ok=True)
            self.temp = False

    def __del__(self) -> None:
        try:
            self.discard()
        except Exception:  # interpreter shutdown: best effort only
            pass


def refine(queries: np.ndarray, candidates: np.ndarray, vectors: VectorFile, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-score ``candidates`` (n_queries, c) with their exact vectors; the best ``k`` of each row.

    Returns ``(scores, ids)`` like a FAISS search; empty slots have id -1 and score -inf.
    """
    exact = vectors.read(candidates)  # (n, c, d)
    scores = np.einsum("ncd,nd->nc", exact, queries).astype(np.float32)
    scores[candidates < 0] = -np.inf
    k = min(k, candidates.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top_ids = np.take_along_axis(candidates, order, axis=1)
    top_scores = np.take_along_axis(scores, order, axis=1)
    top_ids[~np.isfinite(top_scores)] = -1
    return top_scores, top_ids
