"""Split the emoji data set's pairs.jsonl into pair files per style and leave-one-style-out sets.

    python scripts/emoji_pairs.py /work/shared/datasets/emoji OUTDIR

writes OUTDIR/STYLE.jsonl for each style, OUTDIR/without-STYLE.jsonl (every
other style, to train on while STYLE is held out) and OUTDIR/all.jsonl. The
``image`` fields are absolute paths into the data set (nothing is copied).
"""

import json
import sys
from pathlib import Path

root, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
lines: dict[str, list[str]] = {}
for line in (root / "pairs.jsonl").read_text(encoding="utf-8").splitlines():
    rec = json.loads(line)
    lines.setdefault(rec["style"], []).append(
        json.dumps({"image": str(root / rec["image"]), "text": rec["text"]}, ensure_ascii=False) + "\n"
    )
for style, rows in lines.items():
    (out / f"{style}.jsonl").write_text("".join(rows), encoding="utf-8")
    others = [row for other, rest in lines.items() if other != style for row in rest]
    (out / f"without-{style}.jsonl").write_text("".join(others), encoding="utf-8")
    print(style, len(rows), f"without-{style}", len(others), file=sys.stderr)
(out / "all.jsonl").write_text("".join(row for rows in lines.values() for row in rows), encoding="utf-8")
