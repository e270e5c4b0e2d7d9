"""Undecodable files are remembered: an unchanged one is not read again, and an
unchanged folder re-indexes without importing torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from mmsearch.cli import app

ROOT = Path(__file__).resolve().parent.parent


def run(home, model, *args):
    result = CliRunner().invoke(app, ["--home", str(home), "--model", str(model), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def last_json(output: str) -> dict:
    return json.loads([l for l in output.splitlines() if l.startswith("{")][-1])


def test_bad_file_is_remembered_and_retried_when_changed(tiny_model, photo_dir, home):
    bad = photo_dir / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    first = last_json(run(home, tiny_model, "index", str(photo_dir), "--json", "--quiet").stdout)
    assert first["added"] == 6 and first["skipped"] == 1
    second = run(home, tiny_model, "index", str(photo_dir), "--json", "--quiet")
    assert last_json(second.stdout)["skipped"] == 1
    assert "not read again" in second.output
    # fixed in place: read again and indexed
    from PIL import Image

    Image.new("RGB", (40, 30), "orange").save(bad, "JPEG")
    os.utime(bad, ns=(1, 1))
    third = last_json(run(home, tiny_model, "index", str(photo_dir), "--json", "--quiet").stdout)
    assert third["added"] == 1 and third["skipped"] == 0
    fourth = last_json(run(home, tiny_model, "index", str(photo_dir), "--json", "--quiet").stdout)
    assert fourth["unchanged"] == 7 and fourth["skipped"] == 0


def test_unchanged_folder_with_bad_file_never_imports_torch(tiny_model, photo_dir, home):
    (photo_dir / "broken.png").write_bytes(b"\x89PNG broken")
    run(home, tiny_model, "index", str(photo_dir), "--quiet")
    code = (
        "import sys\n"
        "from mmsearch.cli import app\n"
        f"try:\n    app(['--home', {str(home)!r}, 'index', {str(photo_dir)!r}, '--json', '--quiet'])\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "print('TORCH', 'torch' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert json.loads(out.splitlines()[0])["unchanged"] == 6
    assert "TORCH False" in out


def test_bad_file_with_a_non_utf8_name_is_remembered(tiny_model, photo_dir, home):
    bad = os.path.join(os.fsencode(photo_dir), b"caf\xe9-broken.jpg")  # Latin-1 bytes, not UTF-8
    with open(bad, "wb") as fh:
        fh.write(b"not a jpeg")
    first = last_json(run(home, tiny_model, "index", str(photo_dir), "--json", "--quiet").stdout)
    assert first["skipped"] == 1
    second = run(home, tiny_model, "index", str(photo_dir), "--json", "--quiet")
    assert last_json(second.stdout)["skipped"] == 1 and "not read again" in second.output
