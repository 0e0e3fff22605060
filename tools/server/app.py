"""The tool server: one process holds the indexes and encoders; many rollout workers search through it.

Endpoints (JSON; errors are always `{"error": message}` with a 4xx/5xx status):
- `GET  /health`           ok, the index fingerprint, the text modes and whether image search is
                           available, the request limits, and the batcher's counters;
- `GET  /v1/tools`         the tool schemas the policy's system prompt lists;
- `POST /v1/text_search`   `{queries: [str], k, mode?}` -> `{results: [[hit, ...], ...], fingerprint}`;
- `POST /v1/image_search`  `{images: [base64 PNG/JPEG], k, thumbnails?}` -> the same, thumbnails as
                           base64 PNG inside each hit.

Handlers only validate, decode and await: every backend call goes through the `MicroBatcher`, which
runs it off the event loop and fuses concurrent requests into one encoder/FAISS call. The loop also
keeps clear of the other heavy CPU work, so that `/health` answers in milliseconds while the server
is saturated: large request bodies are parsed, images decoded and large responses rendered on a
small codec thread pool. A request body over `max_body_mb` is refused with 413 from its
Content-Length header, or, streamed without one, as soon as it passes the limit: never read in full.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tools.config import ServeConfig, ToolsConfig
from tools.search.types import Hit, SearchBackend
from tools.server.batcher import BackendError, MicroBatcher
from tools.server.codec import ImageDecodeError, decode_image, results_to_json

if TYPE_CHECKING:
    from typing import Self

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

logger = logging.getLogger(__name__)

MAX_K = 100  # results per query; more is a client bug, and responses grow with k
ALL_TEXT_MODES = ["bm25", "dense", "hybrid"]
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# Work below these sizes is done on the event loop: it takes well under a millisecond there, less than
# it costs the loop to wait for the GIL back from a codec thread busy with it. Larger bodies (image
# requests, in practice) are parsed, and larger responses rendered, on the codec pool.
INLINE_PARSE_BYTES = 64 * 1024
INLINE_RENDER_HITS = 100  # ~1.5 ms of rendering; a typical response (one query, k=5) takes ~0.1 ms
# Threads for parsing, image decoding and response rendering. Mostly GIL-bound Python, so more threads
# would only contend with the event loop for the GIL; two let PIL/zlib work (which drops it) overlap.
CODEC_THREADS = 2


class TextSearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    queries: list[str] = Field(min_length=1)
    k: int = Field(5, ge=1, le=MAX_K)
    mode: Literal["bm25", "dense", "hybrid"] | None = None  # None: the backend's default mode


class ImageSearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: list[str] = Field(min_length=1)  # base64 PNG or JPEG
    k: int = Field(5, ge=1, le=MAX_K)
    thumbnails: bool = False


class RequestError(Exception):
    """A well-formed request the server cannot serve (too many queries, bad image, missing index)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class BodyTooLarge(Exception):
    """A request body passed the server's limit while it streamed in."""

    def __init__(self, limit: int):
        super().__init__(f"request body over {limit} bytes")
        self.limit = limit


def _too_large(limit: int) -> JSONResponse:
    # Connection: close, so the rest of the body is never read (uvicorn would otherwise drain it to
    # reuse the connection).
    message = (f"request body is larger than this server's limit of {limit} bytes "
               f"({limit / 2**20:g} MB, max_body_mb): split the request")
    return _error(413, message, headers={"Connection": "close"})


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is refused with 413 before it is read.

    A Content-Length over the limit is refused from the header, before the app runs. A body without
    one (chunked) is counted as it streams in, and the read that passes the limit raises
    `BodyTooLarge` (the app's handler answers 413): at most the limit plus one chunk is held.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _too_large(self.max_bytes)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP parser refuses these before the app sees them
    return None


def _parse(model: type[M], body: bytes) -> M:
    """The request model from a JSON body; a 422 RequestError naming each problem if it does not fit."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise RequestError(422, "invalid request: " + _describe_errors(exc.errors())) from None


def _describe_errors(errors: list[dict]) -> str:
    problems = []
    for err in errors:
        where = ".".join(str(part) for part in err.get("loc", ()) if part != "body")
        problems.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(problems)


def _render(results: list[list[Hit]], fingerprint: str) -> bytes:
    """A search response as JSON bytes (the same encoding as Starlette's JSONResponse)."""
    payload = {"results": results_to_json(results), "fingerprint": fingerprint}
    return json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def _body_schema(model: type[BaseModel]) -> dict:
    """OpenAPI for a body the handler parses itself (FastAPI only documents bodies it parses)."""
    schema = {"content": {"application/json": {"schema": model.model_json_schema()}}, "required": True}
    return {"requestBody": schema}


def _capabilities(backend: SearchBackend) -> tuple[list[str], bool]:
    """Text modes and image search the backend offers. LocalSearch says; other backends are assumed complete."""
    return list(getattr(backend, "text_modes", ALL_TEXT_MODES)), getattr(backend, "has_image_search", True)


def create_app(backend: SearchBackend, cfg: ServeConfig) -> FastAPI:
    text_modes, has_image = _capabilities(backend)
    default_mode = getattr(backend, "default_mode", None)
    batcher = MicroBatcher(backend, max_batch=cfg.max_batch, max_wait_ms=cfg.max_wait_ms)
    if cfg.max_body_mb <= 0:
        raise ValueError(f"max_body_mb must be > 0, got {cfg.max_body_mb}")
    max_body_bytes = int(cfg.max_body_mb * 2**20)
    codec_pool: concurrent.futures.ThreadPoolExecutor | None = None

    enabled = [name for name in ToolsConfig().enabled
               if (name != "text_search" or text_modes) and (name != "image_search" or has_image)]
    tool_schemas = _tool_schemas(ToolsConfig(enabled=enabled), backend)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal codec_pool
        codec_pool = concurrent.futures.ThreadPoolExecutor(max_workers=CODEC_THREADS, thread_name_prefix="codec")
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            codec_pool.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(title="mmsearch tool server", lifespan=lifespan)
    app.state.backend = backend
    app.state.batcher = batcher  # tests and /health read batcher.stats
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, "invalid request: " + _describe_errors(exc.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return _too_large(exc.limit)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s", request.url.path)
        return _error(500, f"internal server error: {type(exc).__name__}: {exc}")

    async def off_loop(fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(codec_pool, fn, *args)

    async def read_request(request: Request, model: type[M]) -> M:
        body = await request.body()  # BodyLimit stops this at max_body_bytes
        return _parse(model, body) if len(body) <= INLINE_PARSE_BYTES else await off_loop(_parse, model, body)

    async def respond(results: list[list[Hit]], thumbnails: bool = False) -> Response:
        # A batch answers all its requests in one turn of the loop, so whatever each one renders
        # there, a /health probe waits for all of it: large responses and thumbnails (PNG encoding)
        # are rendered on the codec pool.
        if thumbnails or sum(len(hits) for hits in results) > INLINE_RENDER_HITS:
            body = await off_loop(_render, results, backend.fingerprint)
        else:
            body = _render(results, backend.fingerprint)
        return Response(body, media_type="application/json")

    def check_count(n: int, what: str) -> None:
        if n > cfg.max_queries_per_request:
            raise RequestError(
                422, f"{n} {what} in one request; the limit is {cfg.max_queries_per_request} "
                     "(max_queries_per_request): split the request"
            )

    limits = {"max_queries_per_request": cfg.max_queries_per_request, "max_k": MAX_K, "max_body_bytes": max_body_bytes}

    # A plain JSONResponse (no response model to validate) of a few constants and counters: /health
    # costs the loop next to nothing and never waits on search work.
    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({
            "status": "ok",
            "fingerprint": backend.fingerprint,
            "text_modes": text_modes,
            "default_text_mode": default_mode,
            "image_search": has_image,
            "limits": limits,
            "batcher": {"max_batch": cfg.max_batch, "max_wait_ms": cfg.max_wait_ms, **batcher.stats.as_dict()},
        })

    @app.get("/v1/tools")
    async def tools() -> dict:
        return {"tools": tool_schemas}

    # The bodies are read and validated here, not by FastAPI, which parses every body on the loop:
    # a 32 MB image request held it for ~90 ms (json.loads, then validation), every request waiting.
    @app.post("/v1/text_search", openapi_extra=_body_schema(TextSearchRequest))
    async def text_search(request: Request) -> Response:
        req = await read_request(request, TextSearchRequest)
        check_count(len(req.queries), "queries")
        mode = req.mode or default_mode
        if mode is not None and mode not in text_modes:
            raise RequestError(400, f"text search mode {mode!r} is not available on this server (it has: {text_modes})")
        try:
            results = await batcher.text_search(req.queries, req.k, mode)
        except BackendError as exc:
            return _error(500, f"text search backend failed: {exc}")
        return await respond(results)

    @app.post("/v1/image_search", openapi_extra=_body_schema(ImageSearchRequest))
    async def image_search(request: Request) -> Response:
        if not has_image:
            raise RequestError(400, "this server has no image index; build it with `mmsearch index build`")
        req = await read_request(request, ImageSearchRequest)
        check_count(len(req.images), "images")
        images = await off_loop(_decode_all, req.images)  # always: a small PNG can hold many pixels
        try:
            results = await batcher.image_search(images, req.k, req.thumbnails)
        except BackendError as exc:
            return _error(500, f"image search backend failed: {exc}")
        return await respond(results, req.thumbnails)

    return app


def _tool_schemas(tools_cfg: ToolsConfig, backend: SearchBackend) -> list[dict]:
    from tools.registry import build_toolbox

    toolbox = build_toolbox(tools_cfg, backend)
    try:
        return toolbox.schemas()
    finally:
        toolbox.close()


def _decode_all(images: list[str]) -> list[Image.Image]:
    decoded = []
    for i, data in enumerate(images):
        try:
            decoded.append(decode_image(data))
        except ImageDecodeError as exc:
            raise RequestError(400, f"images[{i}]: {exc}") from None
    return decoded


def set_cpu_threads(threads: int = 0) -> int:
    """Size torch's and FAISS's CPU thread pools; 0 means the cores this process may use, less one
    for the event loop.

    Both default to every core (torch possibly to the host's count); oversubscribed OpenMP threads
    spin against each other and against the event loop, which then cannot parse the requests that
    should form the next batch (measured on a shared 2-core machine: 2 torch threads took the
    one-at-a-time server from ~45 to ~3 queries/s).
    """
    import faiss
    import torch

    if threads <= 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores - 1)
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    return threads


def run_server(cfg: ServeConfig) -> None:
    """`mmsearch serve`: load the indexes in cfg.index and serve them until interrupted."""
    from tools.search.local import LocalSearch

    backend = LocalSearch(cfg.index, device=cfg.device)
    set_cpu_threads(cfg.cpu_threads)
    app = create_app(backend, cfg)
    # Everything loaded so far (torch, transformers, the indexes: ~530k objects on the demo world)
    # lives as long as the process; freezing it keeps the garbage collector from walking it again.
    # Unfrozen, a full collection came every few seconds under load and stopped every thread for
    # 0.2-0.6 s (measured on the demo world): a /health probe caught in one reads as a dead replica.
    gc.collect()  # the garbage of loading goes first, or it would be frozen for good
    gc.freeze()
    if cfg.host not in LOOPBACK:
        logger.warning("serving on %s: anyone who can reach this address can query the index", cfg.host)
    # One process, one event loop: the indexes and encoders are loaded once; scale out with replicas
    # (more `mmsearch serve` processes, the client takes their URLs). No access log: at thousands of
    # requests per second it costs more than it tells.
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", access_log=False)


class BackgroundServer:
    """Serve an app with uvicorn on a background thread (tests, benchmarks, notebooks).

    `with BackgroundServer(app) as server: SearchClient([server.url])`. Port 0 binds a free port;
    the socket is bound here, before the thread starts, so there is no race for it.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 60.0):
        self.app, self.host, self.port, self.start_timeout_s = app, host, port, start_timeout_s
        self.server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> Self:
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self.server.serve(sockets=[sock])), name=f"uvicorn:{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.server.started:
            self.stop()
            raise RuntimeError(f"tool server on {self.url} did not start within {self.start_timeout_s:g}s")
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)

    def __exit__(self, *exc) -> None:
        self.stop()
