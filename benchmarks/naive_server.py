"""The baseline tool server: one query at a time, the way Search-R1's `retrieval_server.py` works.

Search-R1 serves its retriever from an `async def` FastAPI handler that calls the encoder and FAISS
directly, so the event loop is blocked while a request is searched and concurrent rollout workers
are served one after another; each query is encoded and searched on its own. This reproduces that
design behind the same endpoints and wire format as `tools.server.app`, so `bench_server.py` drives
both with the same load generator and the comparison isolates batching (and only that: same
backend, same torch thread count, same HTTP stack).

    python benchmarks/naive_server.py --index runs/index --port 8001
"""

from __future__ import annotations

import argparse

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from tools.search.types import SearchBackend
from tools.server.app import ImageSearchRequest, TextSearchRequest, set_cpu_threads
from tools.server.codec import decode_image, results_to_json


def create_naive_app(backend: SearchBackend) -> FastAPI:
    app = FastAPI(title="naive tool server (baseline)")
    text_modes = list(getattr(backend, "text_modes", ["bm25", "dense", "hybrid"]))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "fingerprint": backend.fingerprint, "text_modes": text_modes, "image_search": True}

    # Deliberately blocking: the handler is `async def` yet runs the encoder and FAISS inline.
    @app.post("/v1/text_search")
    async def text_search(req: TextSearchRequest) -> JSONResponse:
        results = [backend.text_search([query], req.k, req.mode)[0] for query in req.queries]
        return JSONResponse({"results": results_to_json(results), "fingerprint": backend.fingerprint})

    @app.post("/v1/image_search")
    async def image_search(req: ImageSearchRequest) -> JSONResponse:
        images = [decode_image(data) for data in req.images]
        results = [backend.image_search([image], req.k, req.thumbnails)[0] for image in images]
        return JSONResponse({"results": results_to_json(results), "fingerprint": backend.fingerprint})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", required=True, help="index dir")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    from tools.search.local import LocalSearch

    backend = LocalSearch(args.index, device=args.device)
    set_cpu_threads()  # the same thread budget as the batched server
    uvicorn.run(create_naive_app(backend), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
