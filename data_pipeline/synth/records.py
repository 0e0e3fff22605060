"""The rows synthesis writes, before and after export.

While a run streams, accepted examples are appended to `<out>/work/examples.jsonl`, one JSON object
per line:

    id               "train-000042"
    split            "train" | "validation" | "test"
    images           [absolute path, ...]   the question's images, in order (KB images or composed scenes);
                                            [] in the text modality
    question         str
    answers          [str, ...]             the gold answer first, then its aliases
    kind             str                    the first entity's kind (nation, person, ...; pictured or, in the
                                            text modality, named or described) or, for search-free
                                            questions, the visual attribute (count, colour, ...)
    hops             int                    searches needed (HOP_COUNT): image: 0 search-free, 1 identify,
                                            2-3 follow relations; text: 1-3, the relations and facts
                                            followed (+1 when the first entity is described)
    requires_search  bool
    split_key        str                    the anchor entity (or scene) the split was decided by
    messages         [dict] | null          gold trajectory in DESIGN.md's message schema (images by number)
    meta             dict                   how it was made: view (whole|crop|scene|named|described), path,
                                            entities, description, ...

Export turns these into the dataset dir's rows: `images` become `datasets.Image` (bytes embedded),
`messages` and `meta` become JSON strings (their shapes vary per turn), `split` picks the split.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SPLITS = ("train", "validation", "test")
# How `hops` is counted, as the dataset card states it.
HOP_COUNT = ("searches the gold path makes: one per relation or fact followed, plus one to find the first entity "
             "when it is pictured (image_search) or described (text_search); a named first entity needs none, "
             "and search-free questions have 0")
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
