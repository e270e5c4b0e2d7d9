"""Split the emoji data set's pairs.jsonl into one pair file per style.

    python scripts/emoji_pairs.py /work/shared/datasets/emoji OUTDIR

writes OUTDIR/twitter.jsonl and OUTDIR/facebook.jsonl whose ``image`` fields
are absolute paths into the data set (nothing is copied).
"""

import json
import sys
from pathlib import Path

root, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
files = {}
for line in (root / "pairs.jsonl").read_text(encoding="utf-8").splitlines():
    rec = json.loads(line)
    if rec["style"] not in files:
        files[rec["style"]] = open(out / f"{rec['style']}.jsonl", "w", encoding="utf-8")
    f = files[rec["style"]]
    f.write(json.dumps({"image": str(root / rec["image"]), "text": rec["text"]}, ensure_ascii=False) + "\n")
for style, f in files.items():
    f.close()
    print(style, sum(1 for _ in open(out / f"{style}.jsonl")), file=sys.stderr)
