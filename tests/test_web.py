"""The web app in a real headless Chromium, against a real `mmsearch serve`.

The server is the app `mmsearch serve` runs (with a token), on uvicorn in a
thread, over a home indexed by the CLI with the tiny random model (in-process:
a second Python would import torch again); Playwright drives the system's
Chromium (Debian's ``chromium`` package: no browser download). Without a
Chromium or Playwright the tests skip, unless MMSEARCH_REQUIRE_BROWSER=1
(set by ``.ci/run``), where that is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import COLOURS, make_image
from mmsearch.cli import app

TOKEN = "web-test-token"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
#: a file name that is markup: it must show as text, never become an element
MARKUP_NAME = '<img src=x onerror="window.pwned=1">.png'


def _chromium() -> str | None:
    explicit = os.environ.get("MMSEARCH_CHROMIUM")
    if explicit:
        return explicit
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def _missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if _chromium() is None:
        return "no Chromium found (install Debian's `chromium` package, or set MMSEARCH_CHROMIUM)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    return None


# decided before any fixture runs, so that a skip costs nothing (no model, no server)
if (_MISSING := _missing()) is not None and os.environ.get("MMSEARCH_REQUIRE_BROWSER") != "1":
    pytest.skip(_MISSING, allow_module_level=True)


@pytest.fixture(scope="module")
def web_home(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict[str, Path]:
    """A home with seven images (one whose name is markup) and four texts, indexed by the CLI."""
    root = tmp_path_factory.mktemp("web")
    photos = root / "photos"
    for name, colour in (("red.png", "red"), ("green.png", "green"), ("blue.jpg", "blue"),
                         ("yellow.png", "yellow"), ("black.png", "black"), ("white.png", "white")):
        make_image(photos / name, COLOURS[colour], size=(300, 200))
    make_image(photos / MARKUP_NAME, (200, 120, 40), size=(60, 80))
    corpus = root / "captions.txt"
    corpus.write_text("a red square\na green field\n<b>bold</b> & more\nthe blue sea\n", encoding="utf-8")
    home = root / "home"
    runner = CliRunner()
    for args in (["index", str(photos), "--quiet"], ["add-texts", str(corpus), "--quiet"]):
        result = runner.invoke(app, ["--home", str(home), "--model", str(tiny_model), *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    not_image = root / "notes.png"
    not_image.write_bytes(b"this is not a picture at all")
    return {"home": home, "photos": photos, "not_image": not_image}


@pytest.fixture(scope="module")
def server(web_home: dict[str, Path]) -> Iterator[str]:
    """The app `mmsearch serve` runs, with a token, on uvicorn in a thread on a free loopback port."""
    import uvicorn

    from mmsearch import Library
    from mmsearch.server import bind, create_app

    library = Library.open(web_home["home"], create=False)
    sock = bind("127.0.0.1", 0)
    config = uvicorn.Config(create_app(library, token=TOKEN, warm=True), log_level="warning", lifespan="on")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        if not uv.started:
            pytest.fail("the server did not start")
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        sock.close()
        library.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if _MISSING is not None:
        pytest.fail(f"{_MISSING}, and MMSEARCH_REQUIRE_BROWSER=1")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: object, server: str) -> Iterator[object]:
    """A fresh browser context (no cookie yet) whose JS errors fail the test."""
    context = browser.new_context(viewport={"width": 1100, "height": 800})  # type: ignore[attr-defined]
    context.set_default_timeout(15_000)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab
    context.close()
    assert not errors, errors


def _login(page: object, server: str, query: str = "") -> None:
    """Open the link `serve` prints (with the token), plus a query."""
    page.goto(f"{server}/?token={TOKEN}" + (f"&q={query}" if query else ""))  # type: ignore[attr-defined]


def _loaded_thumbs(page: object) -> list[dict]:
    """Every result thumbnail, once all have finished loading: src, loaded width, the card's path."""
    page.wait_for_function(  # type: ignore[attr-defined]
        "() => { const imgs = [...document.querySelectorAll('#grid img')];"
        " return imgs.length > 0 && imgs.every(i => i.complete); }"
    )
    return page.eval_on_selector_all(  # type: ignore[attr-defined]
        "#grid .card",
        "cards => cards.map(c => ({path: c.title, id: c.dataset.id, src: c.querySelector('img').src,"
        " width: c.querySelector('img').naturalWidth, name: c.querySelector('.name').textContent}))",
    )


def _wait_status(page: object, text: str) -> str:
    page.wait_for_function(  # type: ignore[attr-defined]
        "t => document.getElementById('status-text').textContent.includes(t)", arg=text
    )
    return page.inner_text("#status-text")  # type: ignore[attr-defined]


def test_a_query_link_shows_loaded_thumbnails(page, server, web_home):
    page.goto(f"{server}/?q=a+red+square")
    # no token yet: the API says 401 and the page says what to do
    page.wait_for_selector("#token-form:not([hidden])")
    assert "access token" in page.inner_text("#error")
    assert "mmsearch serve" in page.inner_text("#token-form")
    assert page.locator("#grid .card").count() == 0

    # the token entered there goes to the server, which keeps it in a cookie
    page.fill("#token", TOKEN)
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert page.url == f"{server}/?q=a+red+square"  # the token left the address bar
    assert any(c["name"] == "mmsearch_token" for c in page.context.cookies())
    thumbs = _loaded_thumbs(page)
    assert len(thumbs) == 7
    assert all(t["width"] > 0 for t in thumbs), thumbs
    assert all(re.search(r"/api/thumb/\d+$", t["src"]) for t in thumbs)
    assert {Path(t["path"]).name for t in thumbs} == {p.name for p in web_home["photos"].iterdir()}
    assert page.input_value("#q") == "a red square"
    assert "7 images" in _wait_status(page, "images")

    # the markup in a file name is shown as text and never runs
    marked = [t for t in thumbs if t["name"] == MARKUP_NAME]
    assert len(marked) == 1
    assert page.evaluate("window.pwned") is None
    assert page.locator("#grid img").count() == 7

    # typing a new query and pressing Enter searches and updates the link
    page.fill("#q", "the blue sea")
    page.keyboard.press("Enter")
    page.wait_for_url(f"{server}/?q=the+blue+sea")
    _wait_status(page, "the blue sea")


def test_search_by_uploaded_image_then_more_like_this(page, server, web_home):
    _login(page, server)
    page.wait_for_selector("#welcome:not([hidden])")

    blue = web_home["photos"] / "blue.jpg"
    page.set_input_files("#file", str(blue))
    _wait_status(page, "example image")
    by_example = _loaded_thumbs(page)
    # the uploaded picture is catalogued: the same pixels are the nearest image
    assert Path(by_example[0]["path"]).name == "blue.jpg"
    assert all(t["width"] > 0 for t in by_example)

    # open another result in the large view: its path and the original file
    pick = next(t for t in by_example[1:] if Path(t["path"]).name == "yellow.png")
    page.click(f'#grid .card[data-id="{pick["id"]}"]')
    page.wait_for_selector("#viewer[open]")
    assert page.inner_text("#viewer-path") == pick["path"]
    page.wait_for_function(
        "() => { const i = document.getElementById('viewer-img');"
        " return i.complete && i.naturalWidth > 0 && i.src.includes('/api/file/'); }"
    )
    assert page.evaluate("document.getElementById('viewer-img').naturalWidth") == 300  # the original, not the thumb

    page.click("#similar")
    page.wait_for_url(f"{server}/?similar={pick['id']}")
    assert not page.is_visible("#viewer")
    _wait_status(page, "like yellow.png")
    similar = _loaded_thumbs(page)
    assert Path(similar[0]["path"]).name == "yellow.png"
    assert [t["id"] for t in similar] != [t["id"] for t in by_example]

    # by keyboard: Enter on a result opens it, → steps to the next, Esc closes
    page.focus("#grid .card >> nth=1")
    page.keyboard.press("Enter")
    page.wait_for_selector("#viewer[open]")
    assert page.inner_text("#viewer-path") == similar[1]["path"]
    page.keyboard.press("ArrowRight")
    page.wait_for_function("p => document.getElementById('viewer-path').textContent === p", arg=similar[2]["path"])
    page.keyboard.press("Escape")
    page.wait_for_selector("#viewer:not([open])", state="attached")


def test_texts_switch_errors_and_empty_state(page, server, web_home):
    _login(page, server, "a+green+field")
    _loaded_thumbs(page)
    page.click(".switch >> text=Texts")
    page.wait_for_url(f"{server}/?q=a+green+field&texts=1")
    page.wait_for_selector("#texts li")
    texts = page.eval_on_selector_all("#texts .text", "els => els.map(e => e.textContent)")
    assert sorted(texts) == sorted(["a red square", "a green field", "<b>bold</b> & more", "the blue sea"])
    assert page.locator("#texts b").count() == 0  # shown as text, not markup
    scores = page.eval_on_selector_all("#texts .score", "els => els.map(e => parseFloat(e.textContent))")
    assert scores == sorted(scores, reverse=True)

    # a file that is not an image: one line from the server, and the server stays up
    page.set_input_files("#file", str(web_home["not_image"]))
    page.wait_for_selector("#error:not([hidden])")
    message = page.inner_text("#error")
    assert message and "\n" not in message and "Traceback" not in message
    page.click(".switch >> text=Images")
    _wait_status(page, "7 images for “a green field”")
    assert page.is_hidden("#error")
    assert len(_loaded_thumbs(page)) == 7

    # fewer results than asked for still fill the grid; nothing found shows the empty state
    page.goto(f"{server}/?q=x&k=3")
    assert len(_loaded_thumbs(page)) == 3
    page.route("**/api/search?*", lambda route: route.fulfill(json={"results": [], "took_ms": 1.0}))
    page.fill("#q", "nothing")
    page.keyboard.press("Enter")
    page.wait_for_selector("#empty:not([hidden])")
    assert page.locator("#grid .card").count() == 0
