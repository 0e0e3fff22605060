"""Records stored row by row next to an index, read back by row number without loading them all.

`docs.jsonl` holds one JSON record per indexed row (row = FAISS id = BM25 doc id), and
`docs.offsets.npy` the byte offset of each line, so a lookup is one `os.pread`: thread-safe and
cheap however large the KB is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

DOCS_FILE = "docs.jsonl"
OFFSETS_FILE = "docs.offsets.npy"


class DocStoreWriter:
    def __init__(self, index_dir: Path):
        self._path = index_dir / OFFSETS_FILE
        self._file = (index_dir / DOCS_FILE).open("wb")
        self._offsets: list[int] = []

    def add(self, record: dict) -> None:
        self._offsets.append(self._file.tell())
        self._file.write(json.dumps(record, ensure_ascii=False, sort_keys=True).encode() + b"\n")

    def close(self) -> int:
        self._offsets.append(self._file.tell())  # end sentinel: row i spans offsets[i]..offsets[i+1]
        self._file.close()
        np.save(self._path, np.asarray(self._offsets, dtype=np.int64))
        return len(self._offsets) - 1


class DocStore:
    def __init__(self, index_dir: Path):
        self._offsets = np.load(index_dir / OFFSETS_FILE, mmap_mode="r")
        self._fd = os.open(index_dir / DOCS_FILE, os.O_RDONLY)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, row: int) -> dict:
        start, end = int(self._offsets[row]), int(self._offsets[row + 1])
        return json.loads(os.pread(self._fd, end - start, start))

    def close(self) -> None:
        os.close(self._fd)
