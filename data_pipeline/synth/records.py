"""The rows synthesis writes, before and after export.

While a run streams, accepted examples are appended to `<out>/work/examples.jsonl`, one JSON object
per line:

    id               "train-000042"
    split            "train" | "validation" | "test"
    images           [absolute path, ...]   the question's images, in order (KB images or composed scenes)
    question         str
    answers          [str, ...]             the gold answer first, then its aliases
    kind             str                    pictured entity kind (nation, person, ...) or, for
                                            search-free questions, the visual attribute (count, colour, ...)
    hops             int                    searches needed: 0 search-free, 1 identify, 2-3 follow relations
    requires_search  bool
    split_key        str                    the anchor entity (or scene) the split was decided by
    messages         [dict] | null          gold trajectory in DESIGN.md's message schema (images by number)
    meta             dict                   how it was made: view (whole|crop|scene), path, entities, template, ...

Export turns these into the dataset dir's rows: `images` become `datasets.Image` (bytes embedded),
`messages` and `meta` become JSON strings (their shapes vary per turn), `split` picks the split.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SPLITS = ("train", "validation", "test")
ROW_FIELDS = ("id", "images", "question", "answers", "kind", "hops", "requires_search", "split_key", "messages", "meta")


class FileHashes:
    """sha256 of files by path, each file read once (rows share KB images and scenes): how dedup and
    the dataset fingerprint identify an image by its bytes, not its path."""

    def __init__(self) -> None:
        self._by_path: dict[str, str] = {}

    def of(self, path: str | Path) -> str:
        key = str(path)
        if key not in self._by_path:
            self._by_path[key] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        return self._by_path[key]
