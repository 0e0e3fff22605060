"""`OpenAIChatEngine` against a real HTTP server on loopback.

A small FastAPI app served by uvicorn in a background thread (the project's `BackgroundServer`)
implements `/v1/chat/completions`: it records every request, decodes every image data URL back to
pixels, and answers from a script (fail with a status first, reply with given text and finish
reason, or describe what it received).
"""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import threading
import time

import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image

from mmsearch.engines.base import EngineRefused, GenerationRequest, SamplingParams
from mmsearch.engines.openai_chat import RL_REFUSAL, OpenAIChatEngine, OpenAIEngineError, check_trainable
from mmsearch.protocols.qwen_tools import format_turn
from mmsearch.trajectory import template_view
from tools.server.app import BackgroundServer


class ScriptedChat:
    """The fake endpoint's state: what it received and what it should answer next."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.images: list[list[Image.Image]] = []  # decoded, per request
        self.headers: list[dict] = []
        self.fail_with: list[tuple[int, str]] = []  # statuses to answer before succeeding
        self.delay_s = 0.0
        self.in_flight = self.max_in_flight = 0

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.images.clear()
            self.headers.clear()
            self.fail_with.clear()
            self.delay_s = 0.0
            self.in_flight = self.max_in_flight = 0


def make_app(state: ScriptedChat) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        with state.lock:
            state.requests.append(body)
            state.images.append(_decode_images(body))
            state.headers.append(dict(request.headers))
            failure = state.fail_with.pop(0) if state.fail_with else None
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            if state.delay_s:
                await asyncio.sleep(state.delay_s)
            if failure is not None:
                status, message = failure
                return JSONResponse({"object": "error", "message": message}, status_code=status)
            text, finish = _script(body)
            return {"id": "chatcmpl-test", "object": "chat.completion", "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": finish,
                                 "message": {"role": "assistant", "content": text}}]}
        finally:
            with state.lock:
                state.in_flight -= 1

    return app


def _decode_images(body: dict) -> list[Image.Image]:
    images = []
    for message in body["messages"]:
        if isinstance(message["content"], str):
            continue
        for part in message["content"]:
            if part["type"] == "image_url":
                url = part["image_url"]["url"]
                prefix = "data:image/png;base64,"
                assert url.startswith(prefix), url[:40]
                image = Image.open(io.BytesIO(base64.b64decode(url[len(prefix):])))
                assert image.format == "PNG"
                images.append(image.convert(image.mode))
    return images


def _script(body: dict) -> tuple[str, str]:
    """`REPLY <finish> <text>` in the last user text is answered verbatim; anything else is described."""
    last = body["messages"][-1]
    texts = [last["content"]] if isinstance(last["content"], str) else [
        p["text"] for p in last["content"] if p["type"] == "text"]
    command = texts[-1] if texts else ""
    if command.startswith("REPLY "):
        _, finish, text = command.split(" ", 2)
        return text, finish
    n_images = sum(1 for m in body["messages"] if not isinstance(m["content"], str)
                   for p in m["content"] if p["type"] == "image_url")
    return f"images={n_images} echo={command}", "stop"


@pytest.fixture(scope="module")
def server():
    state = ScriptedChat()
    with BackgroundServer(make_app(state)) as srv:
        srv.state = state
        yield srv


@pytest.fixture()
def state(server) -> ScriptedChat:
    server.state.reset()
    return server.state


@pytest.fixture()
def engine(server):
    with OpenAIChatEngine(f"{server.url}/v1", model="policy-under-test", api_key="sk-test",
                          timeout_s=10, max_retries=2, backoff_s=0.01) as eng:
        yield eng


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def _conversation(question: str, images: list[Image.Image]) -> list[dict]:
    """A schema conversation (system, user with images, assistant tool call, tool with a new image)
    rendered the way the agent loop hands it to a chat engine."""
    messages = [
        {"role": "system", "content": "You are a visual search agent."},
        {"role": "user", "content": [{"type": "image", "image": 0}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": format_turn("crop first", '<tool_call>{"name": "crop"}</tool_call>')},
        {"role": "tool", "content": [{"type": "text", "text": "[image 1]"}, {"type": "image", "image": 1}]},
        {"role": "user", "content": question},
    ]
    return template_view(messages, images)


PARAMS = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=64, seed=11)


def test_wire_format_and_pixels(engine, state):
    images = [_image(0, (37, 23)), _image(1, (16, 48))]
    [reply] = engine.chat([_conversation("describe", images)], PARAMS)
    assert reply == "images=2 echo=describe"

    [body] = state.requests
    assert body["model"] == "policy-under-test"
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["seed"]) == (0.7, 0.9, 64, 11)
    assert "stop" not in body and "top_k" not in body  # the whole turn; top_k only when asked for
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user", "user"]
    assert body["messages"][2]["content"].endswith("</tool_call>")  # assistant text is a plain string
    kinds = [p["type"] for p in body["messages"][3]["content"]]
    assert kinds == ["text", "text", "image_url", "text"]  # <tool_response> wrapper around the tool's parts
    assert body["messages"][3]["content"][0]["text"].startswith("<tool_response>")
    decoded = state.images[0]
    assert [im.size for im in decoded] == [(37, 23), (16, 48)]
    for sent, got in zip(images, decoded):
        assert np.array_equal(np.asarray(sent), np.asarray(got.convert("RGB")))


def test_authorization_header(engine, state, monkeypatch):
    engine.chat([[{"role": "user", "content": "hi"}]], PARAMS)
    assert state.headers[0]["authorization"] == "Bearer sk-test"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    with OpenAIChatEngine(engine.url.removesuffix("/chat/completions") + "/", model="m", max_retries=0) as eng:
        eng.chat([[{"role": "user", "content": "hi"}]], PARAMS)
    assert state.headers[1]["authorization"] == "Bearer sk-from-env"


def test_concurrent_and_in_order(server, state):
    state.delay_s = 0.2
    conversations = [[{"role": "user", "content": [{"type": "text", "text": f"q{i}"}]}] for i in range(12)]
    with OpenAIChatEngine(f"{server.url}/v1", model="m", max_concurrency=4, max_retries=0) as eng:
        t0 = time.perf_counter()
        replies = eng.chat(conversations, SamplingParams(max_new_tokens=8, seed=100))
        elapsed = time.perf_counter() - t0
    assert replies == [f"images=0 echo=q{i}" for i in range(12)]
    assert state.max_in_flight == 4  # bounded by max_concurrency, and actually concurrent
    assert elapsed < 12 * 0.2 / 2  # 3 waves of 0.2 s, not 12 in a row
    assert sorted(b["seed"] for b in state.requests) == list(range(100, 112))  # seed + i: samples differ


def test_top_k_sent_when_set(engine, state):
    engine.chat([[{"role": "user", "content": "x"}]], SamplingParams(top_k=20))
    assert state.requests[0]["top_k"] == 20 and "seed" not in state.requests[0]


def test_retries_503_then_succeeds(engine, state):
    state.fail_with = [(503, "warming up"), (429, "slow down")]
    assert engine.chat([[{"role": "user", "content": "again"}]], PARAMS) == ["images=0 echo=again"]
    assert len(state.requests) == 3


def test_400_raises_with_body(engine, state):
    state.fail_with = [(400, "image too large for this model")]
    with pytest.raises(OpenAIEngineError, match=r"HTTP 400.*image too large for this model"):
        engine.chat([[{"role": "user", "content": "x"}]], PARAMS)
    assert len(state.requests) == 1  # a 4xx is not retried


def test_retries_exhausted_names_url(engine, state):
    state.fail_with = [(502, "bad gateway")] * 3
    with pytest.raises(OpenAIEngineError, match=r"failed after 3 attempt\(s\).*HTTP 502") as err:
        engine.chat([[{"role": "user", "content": "x"}]], PARAMS)
    assert engine.url in str(err.value)


def test_dead_server_raises_with_url():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    url = f"http://127.0.0.1:{port}/v1"
    with (OpenAIChatEngine(url, model="m", max_retries=1, backoff_s=0.01, timeout_s=2) as eng,
          pytest.raises(OpenAIEngineError, match="ConnectError") as err):
        eng.chat([[{"role": "user", "content": "x"}]], PARAMS)
    assert f"{url}/chat/completions" in str(err.value)


@pytest.mark.parametrize(("finish", "text", "expected"), [
    ("stop", '<think>t</think>\n<tool_call>{"name": "crop"}', '<think>t</think>\n<tool_call>{"name": "crop"}</tool_call>'),
    ("stop", "<think>t</think>\n<answer>Paris", "<think>t</think>\n<answer>Paris</answer>"),
    ("stop", "<think>t</think>\n<answer>Paris</answer>", "<think>t</think>\n<answer>Paris</answer>"),
    ("stop", '<tool_call>{"a": 1}</tool_call> then <answer>x', '<tool_call>{"a": 1}</tool_call> then <answer>x</answer>'),
    ("length", "<think>t</think>\n<answer>Par", "<think>t</think>\n<answer>Par"),  # cut by the limit: left as is
    ("stop", "<think>no action</think>", "<think>no action</think>"),
])
def test_closing_tag_repair(engine, state, finish, text, expected):
    [reply] = engine.chat([[{"role": "user", "content": [{"type": "text", "text": f"REPLY {finish} {text}"}]}]], PARAMS)
    assert reply == expected


def test_refused_for_training(engine):
    with pytest.raises(EngineRefused) as err:
        check_trainable(engine)
    assert str(err.value) == RL_REFUSAL
    assert "returns text, not token ids" in RL_REFUSAL and "use the hf or vllm engine for RL" in RL_REFUSAL
    with pytest.raises(EngineRefused, match="not token ids"):
        engine.generate([GenerationRequest(token_ids=[1, 2, 3])], PARAMS, stop_token_ids=[0])

    class TokenLevel:
        token_level = True

    check_trainable(TokenLevel())  # token-level engines pass
