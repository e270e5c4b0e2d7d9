"""``mmsearch serve``: an HTTP API and the web app over one long-lived :class:`~mmsearch.library.Library`.

The routes and their JSON fields are in ``docs/api.md``. A photo library is
private, so:

- the server never opens a path that a client sends: images are reached only
  by catalogue id, and only while they are live (catalogued and on disk);
  query terms are never read as file names; ``/static`` serves only the
  plain file names that the package's web folder holds;
- with a token, every ``/api`` call needs it (header or cookie); without one
  (loopback only), requests must name a loopback host, so a web page
  elsewhere cannot reach the API through DNS rebinding;
- uploads are read up to a size limit and decoded with indexing's
  decompression-bomb guard.

Every error is one JSON line, ``{"error": "..."}``, with a 4xx status.
"""

from __future__ import annotations

import hmac
import json
import mimetypes
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from mmsearch import __version__
from mmsearch.errors import (
    EmptyIndexError,
    InputFileError,
    MmsearchError,
    ModelMismatchError,
    RerankerUnavailableError,
    UsageError,
)
from mmsearch.library import MAX_K, Library

#: The web app's files (owned by the front end; served as they are).
WEB_DIR = Path(__file__).resolve().parent / "web"

#: The largest upload ``POST /api/search`` takes.
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
#: Room for the form's other fields and the multipart framing.
_FORM_OVERHEAD = 64 * 1024

COOKIE = "mmsearch_token"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")

_ID = re.compile(r"[0-9]{1,18}")
_STATIC_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


class JSON(JSONResponse):
    """JSON as ASCII: a file name that is not UTF-8 keeps its exact ``\\udcXX`` escapes."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


class ApiError(Exception):
    """An HTTP error with its one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _status_of(exc: MmsearchError) -> int:
    if isinstance(exc, EmptyIndexError):
        return 404
    if isinstance(exc, InputFileError):
        return 415
    if isinstance(exc, ModelMismatchError):
        return 409
    if isinstance(exc, (UsageError, RerankerUnavailableError)):
        return 400
    return 503


def _one_line(text: str) -> str:
    line = " ".join(str(text).split())
    return line[:500] or "error"


def _error(status: int, message: str) -> JSON:
    return JSON({"error": _one_line(message)}, status_code=status)


def _int_param(name: str, raw: str | None, default: int, low: int, high: int) -> int:
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be a whole number, got {raw[:40]!r}") from None
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be between {low} and {high}, got {value}")
    return value


def _bool_param(name: str, raw: str | None) -> bool:
    value = (raw or "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ApiError(400, f"{name} must be 0 or 1, got {raw[:40]!r}")


def _image_id(raw: str) -> int:
    if not _ID.fullmatch(raw):
        raise ApiError(404, f"no image with id {raw[:40]!r}")
    return int(raw)


def create_app(
    library: Library,
    *,
    token: str | None = None,
    allowed_hosts: Sequence[str] | None = None,
    web_dir: Path = WEB_DIR,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    warm: bool = False,
    on_started: Callable[[], None] | None = None,
    on_stopping: Callable[[], None] | None = None,
) -> FastAPI:
    """The ASGI app over ``library``.

    ``token``: required on every ``/api`` call when given. ``allowed_hosts``:
    the only ``Host`` names accepted (``None``: any). ``warm`` loads the model
    and indexes before the first request; ``on_started`` / ``on_stopping`` run
    once the app is ready and when it shuts down.
    """

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if warm:
            await run_in_threadpool(library.warm)
        if on_started is not None:
            on_started()
        try:
            yield
        finally:
            if on_stopping is not None:
                on_stopping()

    app = FastAPI(
        title="mmsearch", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
        openapi_url=None, default_response_class=JSON,
    )
    app.state.library = library
    hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Any]) -> Response:
        if hosts is not None:
            host = _host_name(request.headers.get("host", ""))
            if host not in hosts:
                return _error(400, f"this server answers only to {', '.join(sorted(hosts))}, not {host[:60]!r}")
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("X-Frame-Options", "DENY")
        return response

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSON:
        return _error(exc.status, exc.message)

    @app.exception_handler(MmsearchError)
    async def library_error(_request: Request, exc: MmsearchError) -> JSON:
        return _error(_status_of(exc), str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSON:
        return _error(exc.status_code, exc.detail if isinstance(exc.detail, str) else "error")

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSON:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(400, f"{where}: {first.get('msg', 'invalid request')}")

    def check_token(request: Request) -> None:
        if token is None:
            return
        given = None
        header = request.headers.get("authorization", "")
        if header[:7].lower() == "bearer ":
            given = header[7:].strip()
        if given is None:
            given = request.cookies.get(COOKIE)
        if given is None or not hmac.compare_digest(given.encode(), token.encode()):
            raise ApiError(401, "a token is needed: open the link that `mmsearch serve` printed")

    api = APIRouter(prefix="/api", dependencies=[Depends(check_token)])

    def results(hits: list[Any], started: float, raw: bool = False, warnings: list[str] | None = None) -> dict[str, Any]:
        out = []
        for hit in hits:
            row = hit.as_dict()
            if hit.kind == "image":
                row["thumb"] = f"/api/thumb/{hit.id}"
            if raw:
                row["score_raw"] = float(hit.score)  # the warm CLI prints the score unrounded
            out.append(row)
        answer: dict[str, Any] = {"results": out, "took_ms": round((time.perf_counter() - started) * 1000, 3)}
        if warnings:
            answer["warnings"] = warnings
        return answer

    @api.get("/info")
    def info() -> dict[str, Any]:
        return {
            "version": __version__,
            "home": str(library.settings.home),
            "model": library.model,
            "reranker": library.has_reranker(),
            "images": library.count("image"),
            "texts": library.count("text"),
            "max_upload_bytes": max_upload_bytes,
            "auth": token is not None,
        }

    @api.get("/status")
    def status() -> dict[str, object]:
        return library.status()

    @api.get("/search")
    def search_get(
        q: str | None = None, k: str | None = None, texts: str | None = None, rerank: str | None = None,
        raw: str | None = None, cutoff: str | None = None,
    ) -> dict[str, Any]:
        started = time.perf_counter()
        if not q or not q.strip():
            raise ApiError(400, "q is missing: give a text query (or POST an image)")
        target = "text" if _bool_param("texts", texts) else "image"
        warnings: list[str] = []
        hits = library.search(
            q, target=target, k=_int_param("k", k, 10, 1, MAX_K),
            rerank_k=_rerank_k(rerank), files=False, on_warning=warnings.append, cutoff=_cutoff(cutoff),
        )
        return results(hits, started, _bool_param("raw", raw), warnings)

    def _cutoff(raw: str | None) -> float | None:
        from mmsearch.relevance import parse_cutoff

        return parse_cutoff(raw or None)

    def _rerank_k(raw: str | None) -> int:
        from mmsearch.rerank import DEFAULT_RERANK_K

        return DEFAULT_RERANK_K if _bool_param("rerank", raw) else 0

    @api.post("/search")
    async def search_post(request: Request) -> dict[str, Any]:
        started = time.perf_counter()
        form = await _read_form(request, max_upload_bytes)
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "the form needs an 'image' file field")
        data = await upload.read()
        await form.close()
        if len(data) > max_upload_bytes:
            raise ApiError(413, f"the image is larger than {_size(max_upload_bytes)}")

        def field(name: str) -> str | None:
            value = form.get(name)
            return value if isinstance(value, str) else None

        q = (field("q") or "").strip() or None
        target = "text" if _bool_param("texts", field("texts")) else "image"
        warnings: list[str] = []
        hits = await run_in_threadpool(
            lambda: library.search(
                q, image=data, target=target, k=_int_param("k", field("k"), 10, 1, MAX_K),
                rerank_k=_rerank_k(field("rerank")), files=False, on_warning=warnings.append,
                cutoff=_cutoff(field("cutoff")),
            )
        )
        return results(hits, started, warnings=warnings)

    def live_image(image_id: str) -> tuple[int, Any]:
        """The id a route names and what the catalog says of that live image; 404 for anything else."""
        number = _image_id(image_id)
        found = library.image_file(number)
        if found is None:
            raise ApiError(404, f"no image with id {number}")
        return number, found

    @api.get("/similar/{image_id}")
    def similar(image_id: str, k: str | None = None) -> dict[str, Any]:
        started = time.perf_counter()
        number, _found = live_image(image_id)
        return results(library.similar(number, _int_param("k", k, 10, 1, MAX_K)), started)

    @api.get("/thumb/{image_id}")
    def thumb(image_id: str) -> Response:
        from mmsearch.thumbs import thumbnail

        number, found = live_image(image_id)
        try:
            made = thumbnail(library.settings.home, found[0], found[1], library.settings.max_file_size)
        except InputFileError as exc:  # the file changed or broke since it was indexed
            raise ApiError(404, f"no thumbnail for image {number}: {exc}") from None
        return Response(
            made.data, media_type=made.media_type,
            headers={"Cache-Control": "private, max-age=86400", "ETag": f'"{made.content_hash}"'},
        )

    @api.get("/file/{image_id}")
    def file(image_id: str) -> Response:
        _number, found = live_image(image_id)
        media_type = mimetypes.guess_type(found[0])[0] or "application/octet-stream"
        if not media_type.startswith("image/") or media_type == "image/svg+xml":
            media_type = "application/octet-stream"
        return FileResponse(
            found[0], media_type=media_type,
            headers={"Cache-Control": "private, max-age=3600", "Content-Security-Policy": "default-src 'none'; sandbox"},
        )

    @api.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    def unknown(rest: str) -> None:
        raise ApiError(404, "no such API route")

    app.include_router(api)

    @app.get("/")
    def page(request: Request) -> Response:
        given = request.query_params.get("token")
        if given is not None:
            if token is not None and not hmac.compare_digest(given.encode(), token.encode()):
                raise ApiError(401, "wrong token: open the link that `mmsearch serve` printed")
            rest = [(key, value) for key, value in request.query_params.multi_items() if key != "token"]
            target = "/" + ("?" + _urlencode(rest) if rest else "")
            response = RedirectResponse(target, status_code=303)
            if token is not None:
                response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/")
            return response
        return _web_file(web_dir, "index.html")

    @app.get("/static/{name:path}")
    def static(name: str) -> Response:
        return _web_file(web_dir, name)

    return app


def _web_file(web_dir: Path, name: str) -> Response:
    """A file of the web folder, by a plain name it holds; nothing else."""
    if not _STATIC_NAME.fullmatch(name) or ".." in name:
        raise ApiError(404, "no such file")
    try:
        names = {entry.name for entry in web_dir.iterdir() if entry.is_file() and not entry.is_symlink()}
    except OSError:
        names = set()
    if name not in names:
        raise ApiError(404, "no such file" if name != "index.html" else "the web app is not installed")
    media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return FileResponse(web_dir / name, media_type=media_type, headers={"Cache-Control": "no-cache"})


def _size(limit: int) -> str:
    mib = 1024 * 1024
    return f"{limit // mib} MiB" if limit % mib == 0 else f"{limit} bytes"


def _urlencode(pairs: list[tuple[str, str]]) -> str:
    from urllib.parse import urlencode

    return urlencode(pairs)


def _host_name(header: str) -> str:
    """The host part of a ``Host`` header, lower-cased, without the port."""
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        return header[: end + 1] if end > 0 else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


async def _read_form(request: Request, limit: int) -> Any:
    """The multipart form of a request, read up to ``limit`` bytes of upload (413 beyond)."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(415, "send the image as multipart/form-data with an 'image' field")
    budget = limit + _FORM_OVERHEAD
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > budget:
        raise ApiError(413, f"the upload is larger than {_size(limit)}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > budget:
            raise ApiError(413, f"the upload is larger than {_size(limit)}")
        chunks.append(chunk)

    async def body() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    parser = MultiPartParser(request.headers, body(), max_files=1, max_fields=8, max_part_size=64 * 1024)
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise ApiError(400, f"cannot read the form: {exc.message}") from None


# -- running it ------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether ``host`` is an address only this machine can reach."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> Any:
    """A listening socket on ``(host, port)`` (port 0: any free one); a one-line error if taken."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this. Without it a response's headers and its
    # body went out as two segments, and the body waited for the client's
    # delayed ACK: every answer took ~40 ms longer than its work.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    return sock


def run(
    library: Library,
    *,
    host: str,
    port: int,
    token: str | None,
    say: Callable[[str], None],
    open_browser: bool = False,
) -> None:
    """Serve ``library`` until interrupted; ``HOME/serve.json`` says where, while it runs."""
    import os
    import threading

    import uvicorn

    from mmsearch.client import ServerRecord, remove_record, write_record

    sock = bind(host, port)
    actual_port = int(sock.getsockname()[1])
    shown_host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    url = f"http://{shown_host}:{actual_port}/"
    link = url + (f"?token={token}" if token else "")
    home_dir = library.settings.home
    pid = os.getpid()

    def started() -> None:
        write_record(home_dir, ServerRecord(
            pid=pid, host=host, port=actual_port, token=token, model=library.model,
            int8=library.settings.int8, version=__version__,
            text_precision=library.settings.text_precision,
        ))
        say(f"serving {library.settings.home} at {link}")
        if open_browser:
            import webbrowser

            threading.Thread(target=webbrowser.open, args=(link,), daemon=True).start()

    allowed = None if token is not None else [*LOOPBACK_HOSTS, host]  # without a token, host is loopback
    app = create_app(
        library, token=token, allowed_hosts=allowed, warm=True,
        on_started=started, on_stopping=lambda: remove_record(home_dir, pid),
    )
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        remove_record(home_dir, pid)
        sock.close()
