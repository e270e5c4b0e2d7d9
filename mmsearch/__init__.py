"""mmsearch: find images by describing them, similar images by example, and
the texts that describe an image."""

__version__ = "0.1.0"
