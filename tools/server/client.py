"""`SearchClient`: the `SearchBackend` protocol over HTTP, against one or more tool-server replicas.

Tools cannot tell it from in-process `LocalSearch`: same methods, same `Hit`s, same scores. One
client is meant to be shared by every thread of a rollout worker (httpx's pool is thread-safe and
keeps connections alive). Requests are split to fit the server's limits, which /health states
(queries per request, request body size). Requests go round-robin over the replicas; a connect error, a timeout or
a 5xx moves the request to the next replica, and a replica that failed to connect is skipped for a
few seconds so that every request does not pay for it again. A 4xx is the caller's mistake and is
raised at once. When every attempt fails, `SearchServerError` says what each replica answered; the
Toolbox turns that into an error result the policy reads.

Every replica must serve the same index (same fingerprint), or the same query would get different
answers depending on where it landed: replicas that disagree are an error at construction, and a
response carrying another fingerprint later (a replica restarted on a rebuilt index) is an error too.
Replicas that are down at construction are not an error: rollout workers may start before the server.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from typing import TYPE_CHECKING

import httpx
from PIL import Image

from tools.search.types import Hit, TextMode
from tools.server.codec import encode_image, results_from_json

if TYPE_CHECKING:
    from typing import Self

logger = logging.getLogger(__name__)

DEFAULT_CHUNK = 64  # queries per request until /health tells us the server's limit
BODY_OVERHEAD = 256  # bytes of a request body besides its queries or images: the keys, k, mode
PROBE_TIMEOUT_S = 5.0
DOWN_COOLDOWN_S = 5.0  # how long a replica that refused a connection is skipped


class SearchServerError(RuntimeError):
    """No replica could answer (all down, timing out or failing), or the replicas disagree."""


class SearchRequestError(ValueError):
    """The server rejected the request (HTTP 4xx): retrying elsewhere would not help."""


class SearchClient:
    def __init__(
        self,
        urls: str | list[str],
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.05,
        max_connections: int = 64,
    ):
        self.urls = [u.rstrip("/") for u in ([urls] if isinstance(urls, str) else list(urls))]
        if not self.urls:
            raise ValueError("SearchClient needs at least one tool-server URL")
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self._http = httpx.Client(
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )
        self._lock = threading.Lock()
        self._turn = itertools.count()
        self._down_until: dict[str, float] = {}
        self._fingerprint: str | None = None
        self.max_queries_per_request = DEFAULT_CHUNK
        self.max_body_bytes: int | None = None  # None: the server states no limit (older servers)
        try:
            self._probe()
        except Exception:
            self._http.close()
            raise

    # ---- SearchBackend

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            errors = self._probe()
            if self._fingerprint is None:
                raise SearchServerError(f"no tool server is reachable: {'; '.join(errors)}")
        return self._fingerprint

    def text_search(self, queries: list[str], k: int, mode: TextMode | None = None) -> list[list[Hit]]:
        results: list[list[Hit]] = []
        for chunk in self._chunks(queries, "query"):
            payload = {"queries": chunk, "k": k, **({"mode": mode} if mode else {})}
            results += results_from_json(self._post("/v1/text_search", payload)["results"])
        return results

    def image_search(self, images: list[Image.Image], k: int, thumbnails: bool = False) -> list[list[Hit]]:
        results: list[list[Hit]] = []
        for chunk in self._chunks([encode_image(img) for img in images], "image"):
            payload = {"images": chunk, "k": k, "thumbnails": thumbnails}
            results += results_from_json(self._post("/v1/image_search", payload)["results"])
        return results

    # ---- extras

    def health(self) -> dict:
        """/health of the first replica that answers."""
        return self._request("GET", "/health")

    def tool_schemas(self) -> list[dict]:
        return self._request("GET", "/v1/tools")["tools"]

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals

    def _chunks(self, items: list[str], what: str) -> list[list[str]]:
        """Consecutive runs of items, one per request: at most max_queries_per_request of them, in a
        body under max_body_bytes. One item too large for any request is a SearchRequestError here:
        the server would refuse it (413)."""
        count_limit = max(1, self.max_queries_per_request)
        byte_limit = self.max_body_bytes
        chunks: list[list[str]] = []
        chunk: list[str] = []
        size = BODY_OVERHEAD
        for i, item in enumerate(items):
            # Measured as JSON (escapes included); base64 and most queries are that long plus 2.
            n = len(json.dumps(item)) + 1 if byte_limit else 0
            if byte_limit and BODY_OVERHEAD + n > byte_limit:
                raise SearchRequestError(
                    f"{what} {i} is {n} bytes as JSON; the tool server takes request bodies of at most "
                    f"{byte_limit} bytes (its max_body_mb)"
                )
            if chunk and (len(chunk) >= count_limit or (byte_limit and size + n > byte_limit)):
                chunks.append(chunk)
                chunk, size = [], BODY_OVERHEAD
            chunk.append(item)
            size += n
        if chunk:
            chunks.append(chunk)
        return chunks

    def _probe(self) -> list[str]:
        """Ask every replica's /health; agreeing replicas set the fingerprint. Returns the failures."""
        fingerprints: dict[str, str] = {}
        errors: list[str] = []
        limits: list[int] = []
        body_limits: list[int] = []
        for url in self.urls:
            try:
                resp = self._http.get(url + "/health", timeout=min(self.timeout_s, PROBE_TIMEOUT_S))
                resp.raise_for_status()
                health = resp.json()
                fingerprints[url] = str(health["fingerprint"])
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:  # TypeError/KeyError: not our server
                errors.append(f"{url}: {_describe(exc)}")
                continue
            if limit := health.get("limits", {}).get("max_queries_per_request"):
                limits.append(int(limit))
            if body_limit := health.get("limits", {}).get("max_body_bytes"):
                body_limits.append(int(body_limit))
        if len(set(fingerprints.values())) > 1:
            listing = ", ".join(f"{url} -> {fp}" for url, fp in fingerprints.items())
            raise ValueError(f"tool-server replicas serve different indexes ({listing}); they would answer differently")
        if limits:
            self.max_queries_per_request = min(limits)
        if body_limits:
            self.max_body_bytes = min(body_limits)
        if fingerprints:
            with self._lock:
                self._fingerprint = self._fingerprint or next(iter(fingerprints.values()))
        if errors:
            logger.warning("tool server(s) not reachable yet: %s", "; ".join(errors))
        return errors

    def _order(self) -> list[str]:
        """Replicas to try for one request: round-robin start; replicas recently down go last."""
        with self._lock:
            start = next(self._turn)
        now = time.monotonic()
        rotated = [self.urls[(start + i) % len(self.urls)] for i in range(len(self.urls))]
        up = [u for u in rotated if self._down_until.get(u, 0.0) <= now]
        return up + [u for u in rotated if u not in up]

    def _post(self, path: str, payload: dict) -> dict:
        data = self._request("POST", path, payload)
        self._check_fingerprint(data.get("fingerprint"))
        return data

    def _request(self, method: str, path: str, payload: dict | None = None) -> dict:
        order = self._order()
        errors: list[str] = []
        for attempt in range(self.retries + 1):
            url = order[attempt % len(order)]
            if attempt and attempt % len(order) == 0:
                # Every replica has failed once: back off before going round again.
                time.sleep(self.backoff_s * 2 ** (attempt // len(order) - 1))
            try:
                resp = self._http.request(method, url + path, json=payload)
            except httpx.TransportError as exc:  # refused, reset, connect/read timeout
                if isinstance(exc, httpx.ConnectError):
                    self._down_until[url] = time.monotonic() + DOWN_COOLDOWN_S
                errors.append(f"{url}: {_describe(exc)}")
                continue
            if resp.status_code >= 500:
                errors.append(f"{url}: HTTP {resp.status_code}: {_server_message(resp)}")
                continue
            if resp.status_code >= 400:
                raise SearchRequestError(
                    f"tool server {url} rejected {path} (HTTP {resp.status_code}): {_server_message(resp)}"
                )
            try:
                return resp.json()
            except ValueError:
                errors.append(f"{url}: HTTP {resp.status_code} with a body that is not JSON")
        raise SearchServerError(
            f"{method} {path} failed after {self.retries + 1} attempt(s) over {len(self.urls)} tool-server "
            f"replica(s): {_summarize(errors)}"
        )

    def _check_fingerprint(self, fingerprint: str | None) -> None:
        with self._lock:
            if self._fingerprint is None:
                self._fingerprint = fingerprint
                return
        if fingerprint != self._fingerprint:
            raise SearchServerError(
                f"a tool-server replica answered from index {fingerprint}, but this client started on "
                f"{self._fingerprint}; all replicas must serve the same index (one was rebuilt or restarted?)"
            )


def _summarize(errors: list[str]) -> str:
    """Distinct errors in order, repeats counted: 'url: ConnectError: ... (x4)'."""
    counts = dict.fromkeys(errors, 0)
    for error in errors:
        counts[error] += 1
    return "; ".join(f"{error} (x{n})" if n > 1 else error for error, n in counts.items())


def _describe(exc: Exception) -> str:
    text = str(exc) or "(no message)"
    return f"{type(exc).__name__}: {text}"


def _server_message(resp: httpx.Response) -> str:
    try:
        data = resp.json()
    except ValueError:
        data = None
    if isinstance(data, dict) and data.get("error"):
        return str(data["error"])
    return resp.text[:300] or "(empty body)"
