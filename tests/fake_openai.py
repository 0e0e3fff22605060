"""A fake OpenAI-compatible chat endpoint for tests: a real FastAPI app on loopback (the project's `BackgroundServer`).

Each test scripts its endpoint with a function of the request body that returns the reply text, or
an HTTP status to fail with. Every request body is recorded.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tools.server.app import BackgroundServer

if TYPE_CHECKING:
    from typing import Self

Reply = Callable[[dict], "str | int"]


class FakeChatEndpoint:
    """`with FakeChatEndpoint(reply) as fake: OpenAIChatEngine(fake.api_base, ...)`."""

    def __init__(self, reply: Reply):
        self.reply = reply
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._server = BackgroundServer(self._app())

    @property
    def api_base(self) -> str:
        return f"{self._server.url}/v1"

    def __enter__(self) -> Self:
        self._server.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop()

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            with self._lock:
                self.requests.append(body)
            reply = self.reply(body)
            if isinstance(reply, int):
                return JSONResponse({"object": "error", "message": f"scripted failure {reply}"}, status_code=reply)
            return {"id": "chatcmpl-fake", "object": "chat.completion", "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": reply}}]}

        return app


def texts(message: dict) -> list[str]:
    """The text parts of a wire message, in order."""
    content = message["content"]
    return [content] if isinstance(content, str) else [p["text"] for p in content if p["type"] == "text"]


def n_images(body: dict) -> int:
    return sum(1 for m in body["messages"] if not isinstance(m["content"], str)
               for p in m["content"] if p["type"] == "image_url")


def dead_url() -> str:
    """An api_base on loopback where nothing listens."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}/v1"
