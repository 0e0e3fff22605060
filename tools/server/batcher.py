"""Micro-batching: many concurrent requests' queries fused into few backend (encoder + FAISS) calls.

A rollout worker sends one query per request, but encoders and FAISS are far cheaper per query in
batches: a GPU encodes 64 queries in about the time of one, and even a CPU does a query 2-5x
cheaper in a batch of 48 than alone (measured here: MiniLM, CLIP, flat FAISS over 100k vectors).
So requests do not call the backend themselves. Each request puts a job on an
asyncio queue and awaits a future. One dispatcher task takes the first pending job, then everything
else pending (up to `max_batch` queries, waiting at most `max_wait_ms` for more to join), groups the
jobs by what a backend call must share — (text, k, mode) or (image, k, thumbnails) — and runs one
backend call per group on a single dedicated thread. The event loop never runs FAISS or an encoder,
so it keeps accepting requests while a batch runs; those requests form the next batch.

One thread, not a pool: the backend holds one encoder per index behind a lock anyway, and a second
batch running beside the first would only split the same cores between two smaller batches.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from tools.search.types import Hit, SearchBackend

logger = logging.getLogger(__name__)


class BackendError(RuntimeError):
    """The backend raised on a batch (the original exception is the `__cause__`), or the server is stopping."""


@dataclass
class _Job:
    """One request's queries (or a max_batch-sized chunk of them) and the future its handler awaits."""

    key: tuple  # ("text", k, mode) or ("image", k, thumbnails): jobs with equal keys share a backend call
    items: list[Any]  # query strings or PIL images
    future: asyncio.Future = field(repr=False)


@dataclass
class BatchStats:
    """Counters the tests and /health read to see that batching actually happens."""

    requests: int = 0
    queries: int = 0
    batches: int = 0  # dispatcher rounds
    backend_calls: int = 0  # one per (key) group per round
    max_batch_queries: int = 0  # largest number of queries in one backend call
    backend_seconds: float = 0.0

    def as_dict(self) -> dict:
        data = dict(vars(self))
        data["backend_seconds"] = round(self.backend_seconds, 3)
        data["mean_queries_per_call"] = round(self.queries / self.backend_calls, 2) if self.backend_calls else 0.0
        return data


class MicroBatcher:
    def __init__(self, backend: SearchBackend, max_batch: int = 64, max_wait_ms: float = 2.0):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.backend = backend
        self.max_batch = max_batch
        self.max_wait_s = max(0.0, max_wait_ms) / 1000
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Job] | None = None
        self._carry: _Job | None = None  # a job that did not fit in the last batch goes first in the next
        self._task: asyncio.Task | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    # ---- lifecycle (inside the server's event loop)

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="search-batch")
        self._task = asyncio.create_task(self._dispatch_forever(), name="search-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        self._task = self._executor = None
        # Jobs still queued would otherwise leave their handlers waiting forever.
        pending = [self._carry] if self._carry else []
        while self._queue is not None and not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for job in pending:
            if not job.future.done():
                job.future.set_exception(BackendError("the tool server is shutting down"))
        self._carry = None

    # ---- what request handlers call

    async def text_search(self, queries: list[str], k: int, mode: str | None) -> list[list[Hit]]:
        return await self._submit(("text", k, mode), queries)

    async def image_search(self, images: list, k: int, thumbnails: bool) -> list[list[Hit]]:
        return await self._submit(("image", k, thumbnails), images)

    async def _submit(self, key: tuple, items: list) -> list[list[Hit]]:
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() has not run (is the app's lifespan enabled?)")
        self.stats.requests += 1
        loop = asyncio.get_running_loop()
        # A request larger than a batch is split, so no backend call ever exceeds max_batch.
        jobs = [
            _Job(key, items[start : start + self.max_batch], loop.create_future())
            for start in range(0, len(items), self.max_batch)
        ]
        for job in jobs:
            self._queue.put_nowait(job)
        parts = await asyncio.gather(*(job.future for job in jobs))
        return [hits for part in parts for hits in part]

    # ---- the dispatcher

    async def _dispatch_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            try:
                outcomes = await loop.run_in_executor(self._executor, self._run_batch, batch)
            except Exception as exc:  # _run_batch catches per group; this is a last resort
                logger.exception("search batch failed")
                error = BackendError(f"{type(exc).__name__}: {exc}")
                outcomes = [error] * len(batch)
            for job, outcome in zip(batch, outcomes):
                if job.future.done():  # the client went away and its handler was cancelled
                    continue
                if isinstance(outcome, BaseException):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)

    async def _collect(self) -> list[_Job]:
        """The next batch: the first pending job, plus whatever joins within max_wait, up to max_batch queries.

        The wait applies even when requests are already queued: the clients of the batch that just
        finished send their next requests within a few ms, and letting them join makes the next
        batch bigger. (Starting at once on the backlog was measured: smaller batches, lower
        throughput on a 2-core machine.)
        """
        first, self._carry = self._carry or await self._queue.get(), None
        batch, size = [first], len(first.items)
        deadline = time.monotonic() + self.max_wait_s
        while size < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if size + len(job.items) > self.max_batch:
                self._carry = job
                break
            batch.append(job)
            size += len(job.items)
        return batch

    def _run_batch(self, batch: list[_Job]) -> list[list[list[Hit]] | BackendError]:
        """On the batch thread: one backend call per key; each job gets its slice or its group's error."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, job in enumerate(batch):
            groups[job.key].append(i)
        outcomes: list[list[list[Hit]] | BackendError] = [[] for _ in batch]
        for key, members in groups.items():
            items = [item for i in members for item in batch[i].items]
            start = time.perf_counter()
            try:
                results = self._call_backend(key, items)
            except Exception as exc:
                logger.exception("search backend failed on a batch of %d %s queries", len(items), key[0])
                error = BackendError(f"{type(exc).__name__}: {exc}")
                error.__cause__ = exc
                for i in members:
                    outcomes[i] = error
                continue
            finally:
                self.stats.backend_calls += 1
                self.stats.queries += len(items)
                self.stats.max_batch_queries = max(self.stats.max_batch_queries, len(items))
                self.stats.backend_seconds += time.perf_counter() - start
            offset = 0
            for i in members:
                n = len(batch[i].items)
                outcomes[i] = results[offset : offset + n]
                offset += n
        self.stats.batches += 1
        return outcomes

    def _call_backend(self, key: tuple, items: list) -> list[list[Hit]]:
        kind, k, option = key
        if kind == "image":
            return _checked(self.backend.image_search(items, k, thumbnails=option), items)
        # The rollouts of one GRPO group often send the very same query: search it once.
        unique = list(dict.fromkeys(items))
        found = dict(zip(unique, _checked(self.backend.text_search(unique, k, option), unique)))
        return [found[query] for query in items]


def _checked(results: list[list[Hit]], queries: list) -> list[list[Hit]]:
    if len(results) != len(queries):
        raise RuntimeError(f"the backend returned {len(results)} result lists for {len(queries)} queries")
    return results
