"""The explorer's HTTP face (Starlette): the static page, and JSON and PNG endpoints that each call one library
function of saevctl.serve (views, edits, the Explorer). Every response carries a Content-Security-Policy; the page
builds its elements with textContent only, so names from the index or an upload are shown, never run.
"""

from __future__ import annotations

import json
import logging
import math
import urllib.parse
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, TypeVar

import anyio.to_thread
import numpy as np
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from saevctl.errors import InputError, SaevctlError
from saevctl.serve import edits, views
from saevctl.serve.config import LOOPBACK, Config
from saevctl.serve.images import UploadTooLarge, check_id
from saevctl.serve.state import Explorer
from saevctl.serve.work import Busy, ViTQueue

log = logging.getLogger(__name__)
T = TypeVar("T")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
"""Only this server's own script, styles and pictures (data: for the edit panels); no inline script, no framing."""
HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
           (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY"),
           (b"cross-origin-resource-policy", b"same-origin")]
STATIC = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
MAX_JSON_BYTES = 64_000
DRAIN_FACTOR = 8
"""An oversized upload is read (and dropped) up to this many times the limit, so the browser gets the answer
instead of a reset connection; beyond that the connection is closed."""


class Forbidden(SaevctlError):
    """A write request from another site's page (answered 403)."""


def jsonable(obj: Any) -> Any:
    """Plain JSON: numpy scalars and arrays as Python values, NaN and infinities as null."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def _json(obj: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(jsonable(obj), status_code=status, headers={"cache-control": "no-store"})


def _png(data: bytes) -> Response:
    return Response(data, media_type="image/png", headers={"cache-control": "private, max-age=300"})


class SecurityHeaders:
    """Adds the CSP and its companions to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *HEADERS]
            await send(message)

        await self.app(scope, receive, send_with if scope["type"] == "http" else send)


def _int(request: Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query_params.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError as e:
        raise InputError(f"bad {name} {text[:20]!r}", f"{name} takes a whole number") from e
    if not low <= value <= high:
        raise InputError(f"{name} {value} is out of range", f"{name} goes {low}..{high}")
    return value


async def _body(request: Request, limit: int, too_large: Callable[[int], SaevctlError]) -> bytes:
    """The request body, refused past `limit` bytes (the rest is read and dropped, up to a cap)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit * DRAIN_FACTOR:
        raise too_large(int(declared))
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n <= limit:
            chunks.append(chunk)
        elif n > limit * DRAIN_FACTOR:
            break
    if n > limit:
        raise too_large(n)
    return b"".join(chunks)


def _same_origin(request: Request) -> None:
    """Write requests only from this server's own page (another site's page cannot post here)."""
    origin = request.headers.get("origin")
    if origin is not None and urllib.parse.urlsplit(origin).netloc != request.headers.get("host"):
        raise Forbidden(f"a request from {origin[:80]} was refused", "use the page this server serves")


async def _json_body(request: Request) -> dict[str, Any]:
    _same_origin(request)
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise InputError("the request body must be JSON", "send Content-Type: application/json")
    raw = await _body(request, MAX_JSON_BYTES, lambda n: InputError("the request is too large", "send less"))
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise InputError("the request body is not valid JSON", "send a JSON object") from e
    if not isinstance(data, dict):
        raise InputError("the request body must be a JSON object", "send {\"image\": ..., \"clamps\": [...]}")
    return data


def _edit_args(data: dict[str, Any]) -> tuple[str, list[str], str]:
    image, clamps = data.get("image"), data.get("clamps")
    if not isinstance(image, str) or not isinstance(clamps, list) or not all(isinstance(c, str) for c in clamps):
        raise InputError("an edit needs an image id and a list of clamps", "send {\"image\": \"12\", "
                         "\"clamps\": [\"100=0\"], \"patches\": \"fired\"}")
    cells = data.get("cells", "")
    patches = edits.probe_patches(str(data.get("patches", "fired")), cells if isinstance(cells, str) else "")
    return check_id(image), [c.strip() for c in clamps][:32], patches


class Api:
    """The JSON and PNG endpoints: each parses its request, then calls one library function (in a worker thread,
    or through the ViT queue when it runs the model)."""

    def __init__(self, ex: Explorer, queue: ViTQueue) -> None:
        self.ex, self.queue = ex, queue

    def routes(self) -> list[Route]:
        return [
            Route("/api/info", self.info), Route("/api/images", self.images),
            Route("/api/image/{image_id}/view.png", self.view), Route("/api/select", self.select),
            Route("/api/strip/{feature:int}.png", self.strip),
            Route("/api/heat/{image_id}/{feature:int}.png", self.heat),
            Route("/api/feature/{feature:int}", self.feature),
            Route("/api/tile/{feature:int}/{rank:int}.png", self.tile),
            Route("/api/upload", self.upload, methods=["POST"]), Route("/api/clamp", self.clamp, methods=["POST"]),
            Route("/api/controls", self.controls, methods=["POST"]),
        ]

    async def codes(self, image_id: str) -> np.ndarray:
        """The image's SAE codes: from the cache, else through the ViT queue."""
        hit = self.ex.cached_codes(check_id(image_id))
        return hit if hit is not None else await self.queue.run(lambda: self.ex.encode(image_id))

    async def info(self, request: Request) -> Response:
        return _json(self.ex.describe())

    async def images(self, request: Request) -> Response:
        q = request.query_params.get("q", "")[:200]
        off, lim = _int(request, "offset", 0, 0, 10**9), _int(request, "limit", 100, 1, 500)
        return _json(self.ex.list_images(q, off, lim))

    async def view(self, request: Request) -> Response:
        image_id = check_id(request.path_params["image_id"])
        return _png(await _thread(lambda: views.view_png(self.ex, image_id)))

    async def select(self, request: Request) -> Response:
        image_id = check_id(request.query_params.get("image", ""))
        cells = request.query_params.get("cells", "")[:20_000]
        found = await self.codes(image_id)
        return _json(await _thread(lambda: views.selection(self.ex, image_id, found, cells)))

    async def strip(self, request: Request) -> Response:
        return _png(await _thread(lambda: views.strip_png(self.ex, request.path_params["feature"])))

    async def heat(self, request: Request) -> Response:
        image_id, f = check_id(request.path_params["image_id"]), request.path_params["feature"]
        found = await self.codes(image_id)
        return _png(await _thread(lambda: views.heat_png(self.ex, image_id, found, f)))

    async def feature(self, request: Request) -> Response:
        other = request.query_params.get("other") or None
        return _json(await _thread(lambda: views.feature_page(self.ex, request.path_params["feature"], other)))

    async def tile(self, request: Request) -> Response:
        p = request.path_params
        return _png(await _thread(lambda: views.tile_png(self.ex, p["feature"], p["rank"])))

    async def upload(self, request: Request) -> Response:
        _same_origin(request)
        name = urllib.parse.unquote(request.headers.get("x-filename", "upload"))[:1000]
        data = await _body(request, self.ex.uploads.max_bytes, self.ex.uploads.too_large)
        return _json((await _thread(lambda: self.ex.uploads.add(data, name))).public())

    async def clamp(self, request: Request) -> Response:
        image_id, clamps, patches = _edit_args(await _json_body(request))
        return _json(await self.queue.run(lambda: edits.clamp(self.ex, image_id, clamps, patches)))

    async def controls(self, request: Request) -> Response:
        image_id, clamps, patches = _edit_args(await _json_body(request))
        return _json(await self.queue.run(lambda: edits.controls(self.ex, image_id, clamps, patches)))


async def _thread(fn: Callable[[], T]) -> T:
    """A blocking call (index reads, PIL) in a worker thread, so the event loop keeps answering."""
    return await anyio.to_thread.run_sync(fn)


def _page_routes() -> list[Route]:
    static = resources.files("saevctl.serve") / "static"
    page = (static / "index.html").read_bytes()
    files = {name: (static / name).read_bytes() for name in STATIC}

    async def index(request: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers={"cache-control": "no-cache"})

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in files:  # a fixed set of names: nothing from the URL reaches the file system
            return _json({"error": f"no such file {name[:40]!r}."}, 404)
        return Response(files[name], media_type=STATIC[name], headers={"cache-control": "no-cache"})

    return [Route("/", index), Route("/static/{name}", asset)]


def _handlers() -> dict[Any, Callable[[Request, Exception], Awaitable[Response]]]:
    async def user_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, SaevctlError)
        status = 413 if isinstance(exc, UploadTooLarge) else 503 if isinstance(exc, Busy) else \
            403 if isinstance(exc, Forbidden) else 400
        return _json({"error": exc.one_line()}, status)

    async def out_of_memory(request: Request, exc: Exception) -> Response:
        return _json({"error": "the server ran out of memory for this request. Try a smaller image or fewer "
                               "control images (--control-images)."}, 503)

    async def crash(request: Request, exc: Exception) -> Response:
        log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _json({"error": f"internal error ({type(exc).__name__}); the server's terminal has the details."},
                     500)

    return {SaevctlError: user_error, MemoryError: out_of_memory, Exception: crash}


def make_app(ex: Explorer, cfg: Config) -> Starlette:
    """The ASGI app over one loaded Explorer. Bound to this machine only, it also refuses requests whose Host is
    not this machine's (a web page cannot reach it through a DNS name it controls)."""
    hosts = list(LOOPBACK) if cfg.local_only else ["*"]
    middleware = [Middleware(SecurityHeaders), Middleware(TrustedHostMiddleware, allowed_hosts=hosts)]
    return Starlette(routes=[*_page_routes(), *Api(ex, ViTQueue(cfg.queue)).routes()], middleware=middleware,
                     exception_handlers=_handlers())
