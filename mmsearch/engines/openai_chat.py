"""`openai` engine: any OpenAI-compatible chat endpoint (`vllm serve`, a hosted VLM) as a policy.

For evaluation, demos and teacher-data generation only. The API returns text, not token ids, so a
trajectory it produces cannot be rebuilt token-exactly (DESIGN.md invariant 1) and is refused for
training: `check_trainable` says so, and so does asking this engine for token-level generation.

Conversations arrive as `template_view(messages, images)` gives them: image parts carry the PIL
image, which goes on the wire as a base64 PNG data URL (lossless, so the endpoint sees exactly
our pixels). Requests run concurrently on a thread pool over one pooled `httpx.Client`, at most
`max_concurrency` in flight; connection errors, timeouts, 5xx and 429 are retried with
exponential backoff (honouring `Retry-After`), any other 4xx is raised at once.
"""

from __future__ import annotations

import base64
import io
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import httpx
from PIL import Image

from mmsearch.engines.base import EngineRefused, GenerationOutput, GenerationRequest, SamplingParams

if TYPE_CHECKING:
    from typing import Self

RL_REFUSAL = (
    "the OpenAI-compatible API returns text, not token ids, so its trajectories cannot be trained on "
    "token-exactly; use the hf or vllm engine for RL"
)
# Tags an action is closed with. Endpoints may be configured with these as server-side stop strings,
# and the OpenAI API strips a matched stop string from the reply (see `_repair_closing_tag`).
_ACTION_TAGS = ("tool_call", "answer")
_BODY_EXCERPT = 500
_MAX_RETRY_AFTER_S = 30.0
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I;16"}


class OpenAIEngineError(RuntimeError):
    """The endpoint rejected a request (4xx other than 429), answered nonsense, or could not be reached."""


def check_trainable(engine) -> None:
    """Raise `EngineRefused` unless `engine` produces token ids (what RL and SFT-from-rollouts need)."""
    if not getattr(engine, "token_level", False):
        raise EngineRefused(RL_REFUSAL)


class OpenAIChatEngine:
    token_level = False

    def __init__(
        self,
        api_base: str,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        max_retries: int = 3,
        max_concurrency: int = 16,
        backoff_s: float = 0.5,
    ):
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.url = api_base.rstrip("/") + "/chat/completions"
        self.model = model
        self.max_retries, self.max_concurrency, self.backoff_s = max_retries, max_concurrency, backoff_s
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(
            timeout=timeout_s, headers=headers,
            limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency),
        )

    # ---- ChatEngine

    def chat(self, conversations: list[list[dict]], params: SamplingParams, trajectories: list | None = None) -> list[str]:
        """One assistant reply per conversation, in order.

        With `params.seed` set, conversation i is sent with seed `seed + i`: reproducible, yet n samples
        of the same conversation still differ. `top_k` is sent only when set (> 0), because the OpenAI
        API itself rejects it; vLLM's server accepts it. `trajectories` is not read: the endpoint
        answers from the messages alone.
        """
        if not conversations:
            return []
        encoded: dict[int, str] = {}  # id(image) -> data URL: samples of one example share their images
        bodies = [self._body(conv, params, i, encoded) for i, conv in enumerate(conversations)]
        workers = min(self.max_concurrency, len(bodies))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="openai-chat") as pool:
            return list(pool.map(self._complete, bodies))

    def generate(self, requests: list[GenerationRequest], params: SamplingParams,
                 stop_token_ids: list[int]) -> list[GenerationOutput]:
        """Token-level generation is what RL needs, and this API cannot give it."""
        raise EngineRefused(RL_REFUSAL)

    # ---- lifecycle

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals

    def _body(self, conversation: list[dict], params: SamplingParams, index: int, encoded: dict[int, str]) -> dict:
        body = {
            "model": self.model,
            "messages": [_wire_message(m, encoded) for m in conversation],
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_new_tokens,
        }
        if params.top_k > 0:
            body["top_k"] = params.top_k
        if params.seed is not None:
            body["seed"] = params.seed + index
        return body

    def _complete(self, body: dict) -> str:
        data = self._post(body)
        try:
            choice = data["choices"][0]
            content = choice["message"].get("content")
            finish = choice.get("finish_reason")
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise OpenAIEngineError(f"{self.url} answered without choices[0].message: {str(data)[:_BODY_EXCERPT]}") from exc
        # content is null when the endpoint turned the reply into something else (e.g. a refusal);
        # an empty turn is what the agent loop then sees, and reads as an invalid action.
        text = content if isinstance(content, str) else ""
        return _repair_closing_tag(text) if finish == "stop" else text

    def _post(self, body: dict) -> dict:
        errors: list[str] = []
        retry_after: float | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self._delay(attempt, retry_after))
            try:
                resp = self._http.post(self.url, json=body)
            except httpx.TransportError as exc:  # refused, reset, connect/read timeout
                errors.append(f"{type(exc).__name__}: {exc}")
                retry_after = None
                continue
            if resp.status_code >= 500 or resp.status_code == 429:
                errors.append(f"HTTP {resp.status_code}: {_excerpt(resp)}")
                retry_after = _retry_after_s(resp)
                continue
            if resp.status_code >= 400:
                raise OpenAIEngineError(f"{self.url} rejected the request (HTTP {resp.status_code}): {_excerpt(resp)}")
            try:
                return resp.json()
            except ValueError as exc:
                raise OpenAIEngineError(f"{self.url} answered HTTP {resp.status_code} with a body that is not JSON: "
                                        f"{_excerpt(resp)}") from exc
        raise OpenAIEngineError(
            f"POST {self.url} failed after {self.max_retries + 1} attempt(s): {'; '.join(errors[-3:])}"
        )

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """The server's Retry-After when it gave one (capped), else exponential backoff with jitter."""
        if retry_after is not None:
            return min(retry_after, _MAX_RETRY_AFTER_S)
        return self.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random())


def _wire_message(message: dict, encoded: dict[int, str]) -> dict:
    content = message["content"]
    if isinstance(content, str):
        return {"role": message["role"], "content": content}
    return {"role": message["role"], "content": [_wire_part(p, encoded) for p in content]}


def _wire_part(part: dict, encoded: dict[int, str]) -> dict:
    if part["type"] == "text":
        return {"type": "text", "text": part["text"]}
    if part["type"] == "image":
        image = part.get("image")
        if not isinstance(image, Image.Image):
            raise ValueError("an image part needs its PIL image under 'image' (use template_view(messages, images))")
        url = encoded.get(id(image))
        if url is None:
            url = encoded[id(image)] = image_data_url(image)
        return {"type": "image_url", "image_url": {"url": url}}
    raise ValueError(f"unsupported content part type {part['type']!r}")


def image_data_url(image: Image.Image) -> str:
    """A lossless base64 PNG data URL of `image` (modes PNG cannot hold go to RGB)."""
    if image.mode not in _PNG_MODES:
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _repair_closing_tag(text: str) -> str:
    """Close an action the endpoint cut at a stop string.

    We send no stop strings (we want the whole turn), but a deployment may add its own, e.g. vLLM's
    `--generation-config` defaults or a hosted model's server-side stops on `</tool_call>`. The API
    then strips the matched stop string, and a finished, well-formed `<tool_call>…` would parse as
    an unclosed tag. Only a turn that ended with finish_reason "stop" is repaired; one cut by the
    token limit ("length") stays as it is, truly incomplete.
    """
    last_tag, last_open = None, -1
    for tag in _ACTION_TAGS:
        opened = text.rfind(f"<{tag}>")
        if opened > text.rfind(f"</{tag}>") and opened > last_open:
            last_tag, last_open = tag, opened
    return text if last_tag is None else f"{text}</{last_tag}>"


def _excerpt(resp: httpx.Response) -> str:
    text = resp.text.strip()
    return text[:_BODY_EXCERPT] + ("…" if len(text) > _BODY_EXCERPT else "") if text else "(empty body)"


def _retry_after_s(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff
