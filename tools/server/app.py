"""The tool server: one process holds the indexes and encoders; many rollout workers search through it.

Endpoints (JSON; errors are always `{"error": message}` with a 4xx/5xx status):
- `GET  /health`           ok, the index fingerprint, the text modes and whether image search is
                           available, the request limits, and the batcher's counters;
- `GET  /v1/tools`         the tool schemas the policy's system prompt lists;
- `POST /v1/text_search`   `{queries: [str], k, mode?}` -> `{results: [[hit, ...], ...], fingerprint}`;
- `POST /v1/image_search`  `{images: [base64 PNG/JPEG], k, thumbnails?}` -> the same, thumbnails as
                           base64 PNG inside each hit.

Handlers only validate, decode and await: every backend call goes through the `MicroBatcher`, which
runs it off the event loop and fuses concurrent requests into one encoder/FAISS call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from tools.config import ServeConfig, ToolsConfig
from tools.search.types import SearchBackend
from tools.server.batcher import BackendError, MicroBatcher
from tools.server.codec import ImageDecodeError, decode_image, results_to_json

if TYPE_CHECKING:
    from typing import Self

logger = logging.getLogger(__name__)

MAX_K = 100  # results per query; more is a client bug, and responses grow with k
ALL_TEXT_MODES = ["bm25", "dense", "hybrid"]
LOOPBACK = ("127.0.0.1", "localhost", "::1")


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


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _capabilities(backend: SearchBackend) -> tuple[list[str], bool]:
    """Text modes and image search the backend offers. LocalSearch says; other backends are assumed complete."""
    return list(getattr(backend, "text_modes", ALL_TEXT_MODES)), getattr(backend, "has_image_search", True)


def create_app(backend: SearchBackend, cfg: ServeConfig) -> FastAPI:
    text_modes, has_image = _capabilities(backend)
    default_mode = getattr(backend, "default_mode", None)
    batcher = MicroBatcher(backend, max_batch=cfg.max_batch, max_wait_ms=cfg.max_wait_ms)

    enabled = [name for name in ToolsConfig().enabled
               if (name != "text_search" or text_modes) and (name != "image_search" or has_image)]
    tool_schemas = _tool_schemas(ToolsConfig(enabled=enabled), backend)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="mmsearch tool server", lifespan=lifespan)
    app.state.backend = backend
    app.state.batcher = batcher  # tests and /health read batcher.stats

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            where = ".".join(str(part) for part in err.get("loc", ()) if part != "body")
            problems.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return _error(422, "invalid request: " + "; ".join(problems))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s", request.url.path)
        return _error(500, f"internal server error: {type(exc).__name__}: {exc}")

    def check_count(n: int, what: str) -> None:
        if n > cfg.max_queries_per_request:
            raise RequestError(
                422, f"{n} {what} in one request; the limit is {cfg.max_queries_per_request} "
                     "(max_queries_per_request): split the request"
            )

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "fingerprint": backend.fingerprint,
            "text_modes": text_modes,
            "default_text_mode": default_mode,
            "image_search": has_image,
            "limits": {"max_queries_per_request": cfg.max_queries_per_request, "max_k": MAX_K},
            "batcher": {"max_batch": cfg.max_batch, "max_wait_ms": cfg.max_wait_ms, **batcher.stats.as_dict()},
        }

    @app.get("/v1/tools")
    async def tools() -> dict:
        return {"tools": tool_schemas}

    @app.post("/v1/text_search")
    async def text_search(req: TextSearchRequest) -> JSONResponse:
        check_count(len(req.queries), "queries")
        mode = req.mode or default_mode
        if mode is not None and mode not in text_modes:
            raise RequestError(400, f"text search mode {mode!r} is not available on this server (it has: {text_modes})")
        try:
            results = await batcher.text_search(req.queries, req.k, mode)
        except BackendError as exc:
            return _error(500, f"text search backend failed: {exc}")
        return JSONResponse({"results": results_to_json(results), "fingerprint": backend.fingerprint})

    @app.post("/v1/image_search")
    async def image_search(req: ImageSearchRequest) -> JSONResponse:
        check_count(len(req.images), "images")
        if not has_image:
            raise RequestError(400, "this server has no image index; build it with `mmsearch index build`")
        images = await run_in_threadpool(_decode_all, req.images)  # PIL decoding is CPU work: off the loop
        try:
            results = await batcher.image_search(images, req.k, req.thumbnails)
        except BackendError as exc:
            return _error(500, f"image search backend failed: {exc}")
        # Thumbnails are PNG-encoded per hit: also CPU work, also off the loop.
        payload = await run_in_threadpool(results_to_json, results) if req.thumbnails else results_to_json(results)
        return JSONResponse({"results": payload, "fingerprint": backend.fingerprint})

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
