"""What every search backend returns and the batched interface they all share.

In-process search (`LocalSearch`), the HTTP client (`SearchClient`) and the cache (`CachedSearch`)
implement the same `SearchBackend` protocol, so the tools never know which one they talk to.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, Protocol, runtime_checkable

from PIL import Image

TextMode = Literal["bm25", "dense", "hybrid"]


@dataclass
class Hit:
    """One search result: a KB passage or a KB image entry."""

    id: str
    title: str
    text: str
    score: float
    entity_id: str | None = None
    path: str | None = None  # image hits: path relative to the KB dir
    thumbnail: Image.Image | None = None  # image hits, only when thumbnails are asked for

    def to_json(self) -> dict:
        """JSON-able form (the thumbnail travels separately, as an image)."""
        data = asdict(self)
        data.pop("thumbnail")
        return data


@runtime_checkable
class SearchBackend(Protocol):
    """Batched text and image search. Each method takes many queries and returns one list per query."""

    @property
    def fingerprint(self) -> str:
        """Identifies the indexes behind the backend (used as part of cache keys)."""
        ...

    def text_search(self, queries: list[str], k: int, mode: TextMode | None = None) -> list[list[Hit]]: ...

    def image_search(
        self, images: list[Image.Image], k: int, thumbnails: bool = False
    ) -> list[list[Hit]]: ...
