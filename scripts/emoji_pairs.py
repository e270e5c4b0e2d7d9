"""Split the emoji data set's pairs.jsonl into pair files per style and leave-one-style-out sets.

    python scripts/emoji_pairs.py /work/shared/datasets/emoji OUTDIR [--extra google=DIR ...]

writes OUTDIR/STYLE.jsonl for each style, OUTDIR/without-STYLE.jsonl (every
other style, to train on while STYLE is held out) and OUTDIR/all.jsonl. The
``image`` fields are absolute paths into the data set (nothing is copied).

``--extra NAME=DIR`` adds another artist's drawings of the same concepts:
DIR holds PNGs named as the data set's (emoji-datasource's file names, for
example ``img/google/64`` of the npm package ``emoji-datasource-google``,
Noto Color Emoji under the Apache License 2.0, or ``assets/png`` of
``emojione@2.2.7``, EmojiOne under CC BY 4.0); names match with or without
the ``fe0f`` variation selector. Each concept found there gets the data
set's caption. An extra style is written as NAME.jsonl and goes into
every without-STYLE.jsonl and all.jsonl; it is never held out itself.
"""

import argparse
import json
import sys
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("dataset", type=Path, help="the emoji data set's folder (with pairs.jsonl)")
parser.add_argument("out", type=Path, help="folder for the pair files")
parser.add_argument("--extra", action="append", default=[], metavar="NAME=DIR",
                    help="another style: a folder of PNGs named as the data set's")
args = parser.parse_args()
root, out = args.dataset.resolve(), args.out
out.mkdir(parents=True, exist_ok=True)


def row(image: Path, text: str) -> str:
    return json.dumps({"image": str(image), "text": text}, ensure_ascii=False) + "\n"


def key(file_name: str) -> str:
    """A file name without its ``fe0f`` variation selectors: emoji sets differ in where they keep them."""
    return "-".join(part for part in Path(file_name).stem.split("-") if part != "fe0f")


lines: dict[str, list[str]] = {}
caption: dict[str, str] = {}  # key of the file name -> caption
for line in (root / "pairs.jsonl").read_text(encoding="utf-8").splitlines():
    rec = json.loads(line)
    lines.setdefault(rec["style"], []).append(row(root / rec["image"], rec["text"]))
    caption.setdefault(key(rec["image"]), rec["text"])
extra: dict[str, list[str]] = {}
for spec in args.extra:
    name, sep, folder = spec.partition("=")
    if not sep or not name or name in lines:
        sys.exit(f"--extra {spec!r}: expected NAME=DIR with a NAME that is not one of the data set's styles")
    found = {key(f.name): f for f in sorted(Path(folder).resolve().glob("*.png"))}
    extra[name] = [row(found[k], text) for k, text in sorted(caption.items()) if k in found]
    if not extra[name]:
        sys.exit(f"--extra {spec!r}: no PNG there is named as one of the data set's")
    (out / f"{name}.jsonl").write_text("".join(extra[name]), encoding="utf-8")
    print(name, len(extra[name]), "(extra)", file=sys.stderr)
added = [r for rows in extra.values() for r in rows]
for style, rows in lines.items():
    (out / f"{style}.jsonl").write_text("".join(rows), encoding="utf-8")
    others = [r for other, rest in lines.items() if other != style for r in rest] + added
    (out / f"without-{style}.jsonl").write_text("".join(others), encoding="utf-8")
    print(style, len(rows), f"without-{style}", len(others), file=sys.stderr)
(out / "all.jsonl").write_text("".join(r for rows in lines.values() for r in rows) + "".join(added), encoding="utf-8")
