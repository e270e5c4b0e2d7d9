"""Check stage: verify that catalog, FAISS indexes and files on disk agree, and repair.

The catalog is the source of truth; the FAISS files are a cache of its
vectors. :func:`check_home` compares them item by item (ids, vectors, dim,
model, generation), looks at the catalog's own integrity and at the indexed
files on disk, and with ``repair`` rebuilds every index that differs from
the catalog. It never loads the model.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from mmsearch.home import Home
from mmsearch.settings import Settings
from mmsearch.schema import KINDS, Kind
from mmsearch.sqlite_backend import read_only_error

#: ``error``: the catalog itself is damaged (repair cannot fix it);
#: ``fixable``: an index differs from the catalog (``--repair`` rebuilds it);
#: ``warning``: worth knowing, harmless (files missing or changed on disk).
Severity = Literal["error", "fixable", "warning"]

#: Vectors in an index may differ from the catalog's by float rounding only.
VECTOR_TOLERANCE = 1e-5
#: How many example paths a finding names.
EXAMPLES = 5


@dataclass
class Finding:
    severity: Severity
    code: str
    message: str
    kind: str = ""


@dataclass
class CheckReport:
    home: str
    model: str | None = None
    dim: int | None = None
    writer_pid: int | None = None
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    missing_files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing but warnings was found."""
        return not any(f.severity != "warning" for f in self.findings)

    def add(self, severity: Severity, code: str, message: str, kind: str = "") -> None:
        self.findings.append(Finding(severity, code, message, kind))

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        return out


def check_home(settings: Settings, *, repair: bool = False) -> CheckReport:
    """Compare catalog, indexes and files of a home; with ``repair``, rebuild what differs."""
    with Home.open(settings, create=False) as home:
        if repair and home.catalog.readonly:
            raise read_only_error(settings.home)
        report = _check(home)
        needed = any(f.severity == "fixable" for f in report.findings) or _temp_files(settings)
        if repair and needed:
            with home.write_lock():
                report.repaired = _repair(home, report)
            repaired = report.repaired
            report = _check(home)
            report.repaired = repaired
    return report


def _check(home: Home) -> CheckReport:
    settings = home.settings
    report = CheckReport(home=str(settings.home), model=home.recorded_model, dim=home.dim)
    report.writer_pid = writer_pid(settings)
    _check_catalog(home, report)
    for kind in KINDS:
        _check_index(home, kind, report)
    _check_files(home, report)
    for tmp in _temp_files(settings):
        report.add("warning", "temp-file", f"{tmp.name}: left over from an interrupted save (--repair removes it)")
    return report


def writer_pid(settings: Settings) -> int | None:
    """The pid holding the home's write lock, or None when no writer runs."""
    try:
        fd = os.open(settings.lock_path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raw = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(raw) if raw.isdigit() else -1
        return None
    finally:
        os.close(fd)


def _check_catalog(home: Home, report: CheckReport) -> None:
    problems = home.catalog.integrity_problems()
    if problems:
        report.add("error", "catalog-damaged", "; ".join(problems))
    dim = report.dim
    for kind in KINDS:
        count = home.catalog.count(kind)
        report.counts[kind] = {"catalog": count, "index": 0}
        if count and dim is None:
            report.add("error", "no-dim", f"the catalog holds {count} {kind}s but records no vector dimension", kind)
        if count and dim is not None:
            bad = home.catalog.count_bad_vectors(kind, dim)
            if bad:
                report.add(
                    "error", "bad-vector",
                    f"{bad} {kind} rows hold a vector that is not {dim} {home.catalog.vector_dtype_name} values", kind,
                )


def _check_index(home: Home, kind: Kind, report: CheckReport) -> None:
    from mmsearch.errors import IndexCorruptError
    from mmsearch.index import VectorIndex, sidecar_path

    settings = home.settings
    path = settings.index_path(kind)
    counts = report.counts[kind]
    if not path.exists() or not sidecar_path(path).exists():
        if counts["catalog"]:
            severity: Severity = "warning" if report.writer_pid else "fixable"
            report.add(severity, "no-index", f"{path.name} is missing (rebuilt on next use or by --repair)", kind)
        return
    try:
        index = VectorIndex.load(path)
    except IndexCorruptError as exc:
        report.add("fixable", "unreadable-index", str(exc), kind)
        return
    counts["index"] = index.count
    generation = home.catalog.generation(kind)
    if index.generation != generation:
        # mid-run a writer's index lags its catalog by design; it saves at the end
        report.add(
            "warning" if report.writer_pid else "fixable", "stale-generation",
            f"{path.name} reflects catalog generation {index.generation}, the catalog is at {generation}"
            + (f" (pid {report.writer_pid} is writing)" if report.writer_pid else ""), kind,
        )
        if report.writer_pid:
            return  # its ids and count lag the catalog too, until the writer saves
    if report.dim is not None and index.dim != report.dim:
        report.add("fixable", "dim-mismatch", f"{path.name} holds {index.dim}-d vectors, the catalog {report.dim}-d", kind)
    if report.model is not None and index.model != report.model:
        report.add("fixable", "model-mismatch", f"{path.name} was built for model {index.model}, the catalog's is {report.model}", kind)
    if index.count != counts["catalog"]:
        report.add("fixable", "count-mismatch", f"{path.name} holds {index.count} vectors, the catalog {counts['catalog']}", kind)
    faiss_ids = index.ids()
    unique_ids = np.unique(faiss_ids)
    catalog_ids = home.catalog.ids(kind)
    if len(unique_ids) != len(faiss_ids):
        report.add("fixable", "duplicate-ids", f"{len(faiss_ids) - len(unique_ids)} ids appear twice in {path.name}", kind)
    orphans = np.setdiff1d(unique_ids, catalog_ids)
    if len(orphans):
        report.add("fixable", "orphan-vectors", f"{len(orphans)} ids in {path.name} are not in the catalog", kind)
    absent = np.setdiff1d(catalog_ids, unique_ids)
    if len(absent):
        report.add("fixable", "missing-vectors", f"{len(absent)} catalog {kind}s have no vector in {path.name}", kind)
    damaged = any(f.code == "bad-vector" and f.kind == kind for f in report.findings)  # already reported
    if index.index_type == "flat" and index.dim == report.dim and len(unique_ids) == len(faiss_ids) and not damaged:
        differ = _count_differing_vectors(home, kind, index, faiss_ids)
        if differ:
            report.add("fixable", "vector-differs", f"{differ} vectors in {path.name} differ from the catalog's", kind)


def _count_differing_vectors(home: Home, kind: Kind, index: Any, faiss_ids: np.ndarray) -> int:
    """How many ids hold a vector in the index unlike the catalog's (exact indexes only)."""
    if not len(faiss_ids):
        return 0
    stored = index.faiss_index.index.reconstruct_n(0, index.count)
    order = np.argsort(faiss_ids)
    sorted_ids, stored = faiss_ids[order], stored[order]
    differ = 0
    for ids, vectors in home.catalog.iter_vectors(kind, index.dim):
        pos = np.searchsorted(sorted_ids, ids)
        pos = np.minimum(pos, len(sorted_ids) - 1)
        present = sorted_ids[pos] == ids
        gap = np.abs(stored[pos[present]] - vectors[present]).max(axis=1) if present.any() else np.zeros(0)
        differ += int((gap > VECTOR_TOLERANCE).sum())
    return differ


def _check_files(home: Home, report: CheckReport) -> None:
    """Indexed files that are gone or changed on disk (``index`` on their folder updates them)."""
    changed: list[str] = []
    for path, size, mtime_ns in home.catalog.image_files():
        try:
            st = os.stat(path)
        except OSError:
            report.missing_files.append(path)
            continue
        if st.st_size != size or st.st_mtime_ns != mtime_ns:
            changed.append(path)
    if report.missing_files:
        report.add(
            "warning", "missing-files",
            f"{len(report.missing_files)} indexed files are not on disk (a disk not mounted? "
            f"`mmsearch index FOLDER` drops the deleted ones), e.g. {_examples(report.missing_files)}", "image",
        )
    if changed:
        report.add(
            "warning", "changed-files",
            f"{len(changed)} indexed files changed on disk since (`mmsearch index FOLDER` updates them), "
            f"e.g. {_examples(changed)}", "image",
        )


def _examples(paths: list[str]) -> str:
    shown = [os.fsencode(p).decode("utf-8", "backslashreplace") for p in paths[:EXAMPLES]]
    return ", ".join(shown) + (", ..." if len(paths) > EXAMPLES else "")


def _temp_files(settings: Settings) -> list[Any]:
    from mmsearch.index import temp_files

    return [p for kind in KINDS for p in temp_files(settings.index_path(kind))]


def _repair(home: Home, report: CheckReport) -> list[str]:
    """Rebuild each index with a fixable finding from the catalog; remove stale temp files."""
    from mmsearch.index import build_from_catalog

    done: list[str] = []
    with home.save_lock():  # no save is in flight, so every temp file is stale
        for tmp in _temp_files(home.settings):
            tmp.unlink(missing_ok=True)
            done.append(f"removed {tmp.name}")
    dim, model = home.dim, home.recorded_model
    for kind in KINDS:
        if dim is None or model is None:
            continue
        if not any(f.severity == "fixable" and f.kind == kind for f in report.findings):
            continue
        index = build_from_catalog(home.catalog, kind, dim, model, home.settings.index_path(kind))
        home.save_index(index)
        done.append(f"rebuilt {home.settings.index_path(kind).name} from the catalog: {index.count} vectors")
    return done
