"""The HTTP API through the ASGI test client: fields, uploads, thumbnails, and every security case."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conftest import make_image
from mmsearch import Library
from mmsearch.server import create_app

SECRET = b"top secret, never served\n"


@pytest.fixture
def client(library):
    with TestClient(create_app(library)) as c:
        yield c


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A file outside the catalog (and an image one, so a traversal could not pass for a format check)."""
    path = tmp_path / "secret.txt"
    path.write_bytes(SECRET)
    make_image(tmp_path / "private.jpg", "red")
    return path


def one_line_error(response) -> str:
    body = response.json()
    assert set(body) == {"error"} and "\n" not in body["error"] and body["error"]
    return body["error"]


def png_bytes(colour=(20, 200, 40), size=(40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


# -- the contract --------------------------------------------------------------


def test_search_fields_and_thumbs(client, library):
    r = client.get("/api/search", params={"q": "a red square", "k": 3})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"results", "took_ms"} and isinstance(body["took_ms"], float)
    assert len(body["results"]) == 3
    in_process = [h.as_dict() for h in library.search("a red square", k=3)]
    for row, expected in zip(body["results"], in_process):
        assert row == {**expected, "thumb": f"/api/thumb/{expected['id']}"}
        assert list(row)[:4] == ["rank", "score", "id", "path"]
    assert client.get(body["results"][0]["thumb"]).status_code == 200


def test_search_texts(client, library, tmp_path):
    corpus = tmp_path / "texts.txt"
    corpus.write_text("a red apple\na blue sea\na green leaf\n")
    library.add_texts(corpus)
    rows = client.get("/api/search", params={"q": "apple", "k": 2, "texts": 1}).json()["results"]
    assert len(rows) == 2 and all("text" in r and "path" not in r and "thumb" not in r for r in rows)
    by_image = client.post("/api/search", data={"texts": "1", "k": "3"}, files={"image": ("x.png", png_bytes())})
    assert by_image.status_code == 200 and len(by_image.json()["results"]) == 3


def test_status_and_info(client, library):
    assert client.get("/api/status").json() == json.loads(json.dumps(library.status()))
    info = client.get("/api/info").json()
    assert info["reranker"] is False and info["images"] == 6 and info["auth"] is False
    assert info["max_upload_bytes"] == 20 * 1024 * 1024


def test_bad_parameters_are_one_line_400s(client):
    for params in ({"q": "red", "k": "0"}, {"q": "red", "k": "ten"}, {"q": "red", "k": "100000"},
                   {"q": ""}, {}, {"q": "red", "texts": "maybe"}, {"q": "red", "rerank": "1"}):
        r = client.get("/api/search", params=params)
        assert r.status_code == 400, params
        one_line_error(r)
    r = client.get("/api/search", params={"q": "red", "texts": "1"})  # no texts in this home
    assert r.status_code == 404 and "no texts" in one_line_error(r)
    assert client.get("/api/nothing-here").status_code == 404


def test_similar(client):
    rows = client.get("/api/similar/3", params={"k": 4}).json()["results"]
    assert rows[0]["id"] == 3 and len(rows) == 4
    for bad in ("999", "abc", "-1", "3.0"):
        r = client.get(f"/api/similar/{bad}")
        assert r.status_code == 404
        one_line_error(r)


# -- uploads -------------------------------------------------------------------------


def test_upload_search_by_example(client, photo_dir):
    data = (photo_dir / "green.png").read_bytes()
    r = client.post("/api/search", files={"image": ("anything.bin", data)}, data={"k": "2"})
    assert r.status_code == 200
    assert r.json()["results"][0]["path"] == str(photo_dir / "green.png")
    both = client.post("/api/search", files={"image": ("g.png", data)}, data={"q": "grass", "k": "2"})
    assert both.status_code == 200


def test_uploads_that_are_not_images_too_large_or_bombs_get_one_line(library, monkeypatch):
    with TestClient(create_app(library, max_upload_bytes=4096)) as small:
        r = small.post("/api/search", files={"image": ("big.png", os.urandom(5000))})
        assert r.status_code == 413 and "4096 bytes" in one_line_error(r)
        r = small.post("/api/search", files={"image": ("x.txt", b"hello, not an image")})
        assert r.status_code == 415
        one_line_error(r)
        r = small.post("/api/search", data={"q": "red"}, files={"picture": ("x.png", png_bytes())})
        assert r.status_code == 400 and "'image'" in one_line_error(r)
        r = small.post("/api/search", data={"q": "red"})  # a form without a file at all
        assert r.status_code == 415
        one_line_error(r)
        r = small.post("/api/search", content=b"raw bytes", headers={"content-type": "image/png"})
        assert r.status_code == 415
        one_line_error(r)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the guard indexing uses, made tiny
        r = small.post("/api/search", files={"image": ("bomb.png", png_bytes(size=(60, 60)))})
        assert r.status_code == 415 and "decompression bomb" in one_line_error(r)
        monkeypatch.undo()
        assert small.get("/api/search", params={"q": "red"}).status_code == 200  # still up


def test_upload_size_limit_without_content_length(library):
    def chunks():
        boundary = b"--xyz\r\n"
        yield boundary + b'Content-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        for _ in range(20):
            yield b"\0" * 1024
        yield b"\r\n--xyz--\r\n"

    with TestClient(create_app(library, max_upload_bytes=4096)) as small:
        r = small.post("/api/search", content=chunks(), headers={"content-type": "multipart/form-data; boundary=xyz"})
        assert r.status_code == 413
        one_line_error(r)


# -- thumbnails ----------------------------------------------------------------------


def test_thumbnail_is_small_upright_and_cached(library, home, tmp_path):
    src = tmp_path / "tall" / "rotated.jpg"
    src.parent.mkdir()
    img = Image.new("RGB", (600, 300), (200, 30, 30))
    for x in range(0, 300):
        img.putpixel((x, 10), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display: the picture is portrait
    img.save(src, "JPEG", exif=exif.tobytes())
    library.add_images([src.parent])
    image_id = next(h.id for h in library.search(image=src, k=3) if h.path == str(src))
    with TestClient(create_app(library)) as c:
        r = c.get(f"/api/thumb/{image_id}")
        assert r.status_code == 200 and r.headers["content-type"] in ("image/webp", "image/jpeg")
        thumb = Image.open(io.BytesIO(r.content))
        assert thumb.size == (128, 256)
        cached = list((home / "thumbs").rglob("*.*"))
        assert len(cached) == 1 and cached[0].read_bytes() == r.content
        digest = library.image_file(image_id)[1]
        assert cached[0].name.startswith(digest) and cached[0].parent.name == digest[:2]
        assert c.get(f"/api/thumb/{image_id}").content == r.content


def test_thumbnail_served_from_memory_when_the_disk_is_full(client, home, monkeypatch):
    import mmsearch.thumbs as thumbs

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(thumbs.tempfile, "mkstemp", full)
    r = client.get("/api/thumb/2")
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size[0] <= 256
    assert not list((home / "thumbs").rglob("*.*")) if (home / "thumbs").exists() else True
    assert client.get("/api/search", params={"q": "red"}).status_code == 200


# -- security --------------------------------------------------------------------------

TRAVERSALS = [
    "..", "%2e%2e", "..%2F..%2Fsecret.txt", "%2e%2e%2f%2e%2e%2fsecret.txt", "..%5c..%5csecret.txt",
    "1%00", "1%00.jpg", "%00", "%2Fetc%2Fpasswd", "/etc/passwd", "//etc/passwd", "C:%5Cwindows",
    "abc", "-1", "1.5", "1e3", "0x1", " 1", "1 ", "+1", "99999999999999999999999", "0", "999",
]


def _raw_get(client: TestClient, path: str):
    """GET with the path sent exactly as written (no client-side normalisation of dot segments)."""
    return client.get(path)


def test_file_and_thumb_serve_only_live_catalogued_images(client, library, photo_dir, secret, tmp_path):
    live = library.image_file(1)
    assert client.get("/api/file/1").content == Path(live[0]).read_bytes()
    bodies = []
    for route in ("file", "thumb", "similar"):
        for probe in TRAVERSALS + [str(secret), str(secret).replace("/", "%2F"), "../" * 8 + "etc/passwd"]:
            r = _raw_get(client, f"/api/{route}/{probe}")
            assert r.status_code in (400, 404), (route, probe, r.status_code)
            bodies.append(r.content)
    assert not any(SECRET in b or b"root:" in b for b in bodies)


def test_deleted_vanished_and_text_ids_are_not_served(library, photo_dir, tmp_path, home, tiny_model):
    with TestClient(create_app(library)) as c:
        victim = photo_dir / "red.jpg"
        victim_id = next(h.id for h in library.search(image=victim, k=6) if h.path == str(victim))
        victim.unlink()  # vanished from disk, still in the catalog
        assert c.get(f"/api/file/{victim_id}").status_code == 404
        assert c.get(f"/api/thumb/{victim_id}").status_code == 404
        library.add_images([photo_dir])  # now deleted from the catalog too
        assert library.image_file(victim_id) is None
        assert c.get(f"/api/file/{victim_id}").status_code == 404
        assert c.get(f"/api/similar/{victim_id}").status_code == 404
    text_home = tmp_path / "texts-only"
    corpus = tmp_path / "c.txt"
    corpus.write_text("one\ntwo\nthree\n")
    with Library.open(text_home, model=str(tiny_model)) as texts_only:
        texts_only.add_texts(corpus)
        with TestClient(create_app(texts_only)) as c:
            for i in (1, 2, 3):  # ids of texts are not images
                assert c.get(f"/api/file/{i}").status_code == 404
                assert c.get(f"/api/thumb/{i}").status_code == 404


def test_query_terms_are_never_opened_as_paths(client, secret, tmp_path, monkeypatch):
    import mmsearch.search as search_mod

    monkeypatch.setattr(search_mod, "open_query_image", lambda *a, **k: pytest.fail("the server opened a path"))
    for q in (str(tmp_path / "private.jpg"), f"cat + {tmp_path / 'private.jpg'}", "2:" + str(tmp_path / "private.jpg")):
        r = client.get("/api/search", params={"q": q})
        assert r.status_code == 200 and str(tmp_path / "private.jpg") not in r.text


def test_static_serves_only_files_of_the_web_folder(library, tmp_path, secret):
    web = tmp_path / "web"
    web.mkdir()
    (web / "index.html").write_text("<p>page</p>")
    (web / "app.js").write_text("console.log(1)")
    (web / "link.js").symlink_to(secret)
    (web / "sub").mkdir()
    (web / "sub" / "x.js").write_text("nested")
    with TestClient(create_app(library, web_dir=web)) as c:
        assert c.get("/").text == "<p>page</p>"
        r = c.get("/static/app.js")
        assert r.status_code == 200 and r.text == "console.log(1)" and "javascript" in r.headers["content-type"]
        probes = ["link.js", "sub/x.js", "sub%2Fx.js", "..", "../secret.txt", "%2e%2e/secret.txt", "..%2Fsecret.txt",
                  "%2e%2e%2fsecret.txt", str(secret), "%2F" + str(secret)[1:].replace("/", "%2F"), "app.js%00",
                  "app.js%00.png", ".", ".hidden", "", "index.html/", "app.js/..", "nope.js"]
        for probe in probes:
            r = c.get(f"/static/{probe}")
            # the client folds dot segments ("/static/.." is "/"): only the web folder's own page may come back
            assert r.status_code in (400, 404) or r.content == b"<p>page</p>", (probe, r.status_code)
            assert SECRET not in r.content and b"nested" not in r.content


def test_token_header_cookie_and_page_link(library):
    with TestClient(create_app(library, token="s3cret-token")) as c:
        for path in ("/api/search?q=red", "/api/status", "/api/info", "/api/thumb/1", "/api/file/1", "/api/similar/1"):
            r = c.get(path)
            assert r.status_code == 401, path
            one_line_error(r)
            assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
        assert c.post("/api/search", files={"image": ("x.png", png_bytes())}).status_code == 401
        r = c.get("/?token=wrong")
        assert r.status_code == 401 and "mmsearch_token" not in r.headers.get("set-cookie", "")
        r = c.get("/?token=s3cret-token&q=red+car", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/?q=red+car"
        cookie = r.headers["set-cookie"]
        assert "mmsearch_token=s3cret-token" in cookie and "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
        c.cookies.set("mmsearch_token", "s3cret-token")
        assert c.get("/api/search", params={"q": "red"}).status_code == 200


def test_loopback_server_refuses_foreign_host_names(library):
    app = create_app(library, allowed_hosts=["127.0.0.1", "localhost", "::1", "[::1]"])
    with TestClient(app, base_url="http://127.0.0.1:8765") as c:
        assert c.get("/api/search", params={"q": "red"}).status_code == 200
        r = c.get("/api/search", params={"q": "red"}, headers={"Host": "evil.example:8765"})
        assert r.status_code == 400
        one_line_error(r)
        assert c.get("/api/status", headers={"Host": "localhost:8765"}).status_code == 200
        assert c.get("/api/status", headers={"Host": "[::1]:8765"}).status_code == 200


# -- serving while another process indexes --------------------------------------------


def test_queries_keep_working_while_index_runs_in_another_process(library, client, home, tmp_path):
    incoming = tmp_path / "incoming"
    for i in range(24):
        make_image(incoming / f"n{i:02d}.png", ((i * 41) % 256, (i * 7) % 256, 200), size=(64, 48))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmsearch", "--home", str(home), "--batch-size", "4", "index", str(incoming), "--quiet"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    answered, counts = 0, set()
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            r = client.get("/api/search", params={"q": "blue", "k": 100})
            assert r.status_code == 200, r.text
            rows = r.json()["results"]
            assert [row["rank"] for row in rows] == list(range(1, len(rows) + 1))
            counts.add(len(rows))
            answered += 1
            time.sleep(0.05)  # leave the indexer some CPU
    finally:
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert answered > 0
    final = client.get("/api/search", params={"q": "blue", "k": 100}).json()["results"]
    assert len(final) == 30  # every new image, without a restart
    assert client.get("/api/info").json()["images"] == 30
    new_id = next(row["id"] for row in final if "/incoming/" in row["path"])
    assert client.get(f"/api/thumb/{new_id}").status_code == 200


def test_rerank_where_the_model_has_a_reranker(untrained_rerank_model, photo_dir, tmp_path):
    corpus = tmp_path / "texts.txt"
    corpus.write_text("a red apple\na blue sea\na green leaf\n")
    with Library.open(tmp_path / "rr-home", model=str(untrained_rerank_model)) as lib:
        lib.add_images([photo_dir])
        lib.add_texts(corpus)
        with TestClient(create_app(lib)) as c:
            assert c.get("/api/info").json()["reranker"] is True
            plain = c.get("/api/search", params={"q": "red", "k": 4}).json()["results"]
            reranked = c.get("/api/search", params={"q": "red", "k": 4, "rerank": 1}).json()["results"]
            # an untrained re-ranker adds nothing: the same order, with the dual score kept
            assert [r["id"] for r in reranked] == [r["id"] for r in plain]
            assert all(r["dual_score"] == pytest.approx(r["score"], abs=1e-5) and "thumb" in r for r in reranked)
            by_image = c.post("/api/search", data={"texts": "1", "rerank": "1", "k": "2"},
                              files={"image": ("x.png", png_bytes())})
            assert by_image.status_code == 200 and all("dual_score" in r for r in by_image.json()["results"])
            r = c.post("/api/search", data={"rerank": "1"}, files={"image": ("x.png", png_bytes())})
            assert r.status_code == 400 and "--" not in one_line_error(r)


def test_served_connections_send_small_writes_at_once():
    """Accepted connections have TCP_NODELAY: a response's body never waits for the client's delayed ACK."""
    import socket

    from mmsearch.server import bind

    listener = bind("127.0.0.1", 0)
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    try:
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        for sock in (accepted, client, listener):
            sock.close()
