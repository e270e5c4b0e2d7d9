"""Run ``mmsearch index ARGS...`` exactly as the CLI does, recording when each batch was written.

A helper of ``bench/ray_index.py``, run as its own process. The CLI's progress
bar is replaced by a callback that stamps ``(seconds, images done)`` per batch;
the stamps go to the JSON file named by the first argument. A script, not a
library call: it patches ``mmsearch.indexer.index_paths`` for this process only.

    python bench/_timed_index.py STAMPS.json --home H --model M index FOLDER --json --ray
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import mmsearch.indexer as indexer  # noqa: E402


def main() -> None:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    stamps: list[tuple[float, int]] = []
    plain = indexer.index_paths

    def timed(*args, progress=True, **kwargs):
        return plain(*args, progress=lambda done, _total: stamps.append((time.perf_counter(), done)), **kwargs)

    indexer.index_paths = timed
    from mmsearch.cli import main as cli

    sys.argv = ["mmsearch", *argv]
    try:
        cli()
    finally:
        out.write_text(json.dumps(stamps))


if __name__ == "__main__":
    main()
