"""Previews: small thumbnails drawn inline in terminals that show images (``search --preview``).

Two protocols: kitty's graphics protocol (kitty, Ghostty, and WezTerm, which
also speaks iTerm2's) and iTerm2's inline images (iTerm2, WezTerm). Which
one a terminal speaks is read from the environment it gives its programs
(``KITTY_WINDOW_ID``, ``TERM``, ``TERM_PROGRAM``, ``LC_TERMINAL``), which the
front end passes in; nothing here reads the process's environment. Sixel is
not drawn: a terminal that only speaks it gets the one line that says so.
Inside tmux or screen the escape sequences would be swallowed, so they are
not sent there either.

The picture is the home's cached thumbnail (:mod:`mmsearch.thumbs`), sent as
a PNG of at most :data:`PREVIEW_PIXELS` on its long side and scaled by the
terminal to :data:`PREVIEW_COLUMNS` character cells wide.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

from mmsearch.errors import InputFileError

if TYPE_CHECKING:
    from mmsearch.settings import Settings

Protocol = Literal["kitty", "iterm2"]

#: Width of a preview, in character cells (its height follows the picture's shape).
PREVIEW_COLUMNS = 10
#: Long side of the PNG sent to the terminal, in pixels.
PREVIEW_PIXELS = 128
#: Base64 bytes per kitty escape sequence (the protocol's limit).
KITTY_CHUNK = 4096


def detect(env: Mapping[str, str]) -> Protocol | None:
    """The inline-image protocol of the terminal that ``env`` (a process environment) describes, if any."""
    if env.get("TMUX") or env.get("TERM", "").startswith(("screen", "tmux")):
        return None
    term, program = env.get("TERM", ""), env.get("TERM_PROGRAM", "")
    if env.get("KITTY_WINDOW_ID") or term == "xterm-kitty" or program == "ghostty" or term == "xterm-ghostty":
        return "kitty"
    if program in ("iTerm.app", "WezTerm") or env.get("LC_TERMINAL") == "iTerm2":
        return "iterm2"
    return None


def unsupported(env: Mapping[str, str]) -> str:
    """The one line that says why ``--preview`` draws nothing in this terminal."""
    if env.get("TMUX") or env.get("TERM", "").startswith(("screen", "tmux")):
        where = "inside tmux or screen"
    else:
        name = env.get("TERM_PROGRAM") or env.get("TERM") or "unknown"
        where = f"in this terminal ({name})"
    return (
        f"--preview: no inline images {where}; they need kitty, Ghostty, iTerm2 or WezTerm "
        "(sixel is not supported)"
    )


def preview_png(thumbnail: bytes) -> bytes:
    """A thumbnail (WebP or JPEG bytes) as a small PNG, which every protocol here accepts."""
    from PIL import Image

    with Image.open(io.BytesIO(thumbnail)) as img:
        img = img.convert("RGB")
        img.thumbnail((PREVIEW_PIXELS, PREVIEW_PIXELS))
        out = io.BytesIO()
        img.save(out, "PNG", optimize=True)
    return out.getvalue()


def kitty_image(png: bytes, columns: int = PREVIEW_COLUMNS) -> str:
    """kitty's escape sequences that draw ``png`` at the cursor, ``columns`` cells wide.

    Sent in chunks of :data:`KITTY_CHUNK` base64 bytes (``m=1``: more follow);
    ``q=2`` asks the terminal not to answer, so no reply lands in the shell.
    """
    data = base64.standard_b64encode(png).decode("ascii")
    chunks = [data[i:i + KITTY_CHUNK] for i in range(0, len(data), KITTY_CHUNK)] or [""]
    out = []
    for number, chunk in enumerate(chunks):
        more = int(number < len(chunks) - 1)
        head = f"a=T,f=100,q=2,c={columns},m={more}" if number == 0 else f"m={more}"
        out.append(f"\x1b_G{head};{chunk}\x1b\\")
    return "".join(out)


def iterm2_image(png: bytes, columns: int = PREVIEW_COLUMNS) -> str:
    """iTerm2's escape sequence that draws ``png`` inline, ``columns`` cells wide."""
    data = base64.standard_b64encode(png).decode("ascii")
    return f"\x1b]1337;File=inline=1;size={len(png)};width={columns};preserveAspectRatio=1:{data}\x07"


def inline_image(protocol: Protocol, png: bytes, columns: int = PREVIEW_COLUMNS) -> str:
    """The escape sequences that draw ``png`` in a terminal that speaks ``protocol``."""
    return kitty_image(png, columns) if protocol == "kitty" else iterm2_image(png, columns)


def previews(settings: "Settings", items: Sequence[tuple[int, str]], protocol: Protocol) -> dict[int, str]:
    """``id -> escape sequences`` drawing the thumbnail of each catalogued image ``(id, path)``.

    Thumbnails come from the home's cache, made there from the file when
    missing. An image whose file cannot be read now is left out (its result
    line is printed without a preview).
    """
    from mmsearch.store import Catalog
    from mmsearch.thumbs import thumbnail

    if not items:
        return {}
    with Catalog.open(settings.catalog_path, create=False) as catalog:
        hashes = catalog.image_hashes([int(i) for i, _ in items])
    out: dict[int, str] = {}
    for image_id, path in items:
        digest = hashes.get(int(image_id))
        if digest is None:
            continue
        try:
            thumb = thumbnail(settings.home, path, digest, settings.max_file_size)
            out[int(image_id)] = inline_image(protocol, preview_png(thumb.data))
        except (InputFileError, OSError, ValueError):
            continue
    return out
