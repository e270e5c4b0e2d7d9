"""mmsearch: find images by describing them, similar images by example, and
the texts that describe an image."""

__version__ = "0.1.0"

__all__ = ["Library", "__version__"]


def __getattr__(name: str) -> object:
    # imported on first use, so `import mmsearch` (and `mmsearch --help`) stays fast
    if name == "Library":
        from mmsearch.library import Library

        return Library
    raise AttributeError(f"module 'mmsearch' has no attribute {name!r}")
