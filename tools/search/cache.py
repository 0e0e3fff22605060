"""A disk cache in front of any SearchBackend, keyed by (tool, normalised args, index fingerprint).

Rollouts and evaluations repeat the same searches; with the cache they are reproducible (the
result is the one first seen for that index) and cost a lookup. A rebuilt index has a new
fingerprint, so stale entries are never served.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import diskcache
from PIL import Image

from tools.search.types import Hit, SearchBackend, TextMode


def image_digest(image: Image.Image) -> str:
    rgb = image.convert("RGB")
    return hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()


class CachedSearch:
    def __init__(self, backend: SearchBackend, cache_dir: str | Path):
        self.backend = backend
        self.cache = diskcache.Cache(str(cache_dir))
        self.hits = self.misses = 0

    @property
    def fingerprint(self) -> str:
        return self.backend.fingerprint

    def text_search(self, queries: list[str], k: int, mode: TextMode | None = None) -> list[list[Hit]]:
        keys = [("text_search", " ".join(q.split()), k, mode, self.fingerprint) for q in queries]
        return self._cached(keys, lambda idx: self.backend.text_search([queries[i] for i in idx], k, mode))

    def image_search(self, images: list[Image.Image], k: int, thumbnails: bool = False) -> list[list[Hit]]:
        keys = [("image_search", image_digest(img), k, thumbnails, self.fingerprint) for img in images]
        return self._cached(keys, lambda idx: self.backend.image_search([images[i] for i in idx], k, thumbnails))

    def _cached(self, keys: list[tuple], search) -> list[list[Hit]]:
        results = [self.cache.get(key) for key in keys]
        missing = [i for i, r in enumerate(results) if r is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            for i, hits in zip(missing, search(missing)):
                self.cache.set(keys[i], hits)
                results[i] = hits
        return results  # type: ignore[return-value]

    def close(self) -> None:
        self.cache.close()
