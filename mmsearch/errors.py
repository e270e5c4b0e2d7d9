"""Every expected failure of mmsearch, as one typed hierarchy.

The CLI turns any :class:`MmsearchError` into a single line on stderr and a
non-zero exit; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MmsearchError(Exception):
    """Base class: a failure the user can act on, described in one line."""

    exit_code = 1


class UsageError(MmsearchError):
    """A value given on the command line (or to the API) makes no sense."""

    exit_code = 2


class ModelSpecError(MmsearchError):
    """A model spec that cannot be parsed or names no known model."""


class ModelUnavailableError(MmsearchError):
    """Weights that cannot be had: no network and nothing cached, or a bad file."""


class UnsafeCheckpointError(ModelUnavailableError):
    """A checkpoint that would need arbitrary code (a pickle) to load."""


class ModelMismatchError(MmsearchError):
    """A home whose vectors were made by another model than the one asked for."""


class ModelChangedError(ModelMismatchError):
    """The home switched to another model (``mmsearch reindex``) while this process held it open."""


class CatalogError(MmsearchError):
    """The SQLite catalog cannot be opened, migrated or read."""


class IndexCorruptError(MmsearchError):
    """The FAISS file or its sidecar disagree with what they should hold."""


class HomeLockedError(MmsearchError):
    """Another process is writing to the same home."""


class HomeWriteError(MmsearchError):
    """A file of the home cannot be written (a full disk, an I/O error); what was committed is kept."""


class ReadOnlyHomeError(HomeWriteError):
    """A writing command on a home that cannot be written (read-only media, another user's folder)."""


class InputFileError(MmsearchError):
    """A file handed to a command (a text corpus, a query image, pairs) is unusable."""


class EmptyIndexError(MmsearchError):
    """A search on a home that holds nothing of the kind asked for."""


class RerankerUnavailableError(MmsearchError):
    """Re-ranking asked of a model that has no (loadable) re-ranker."""


class SharedMountError(MmsearchError):
    """A Ray worker cannot read a file the driver can: the folders are not shared at the same path."""
