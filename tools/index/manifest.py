"""The `manifest.json` every index subdir carries, and the encoder check made when loading one.

Loading an index with another encoder than the one that built it gives vectors from a different
space: searches return confident garbage. So the check is strict and the error says how to fix it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1


class IndexLoadError(ValueError):
    """An index dir is missing, incomplete, or does not fit the encoder it is used with."""


@dataclass
class Manifest:
    kind: str  # "bm25" | "dense_text" | "clip_image"
    encoder: str  # encoder name ("bm25s" for BM25)
    encoder_version: str
    dim: int  # embedding dim (0 for BM25)
    faiss_factory: str  # FAISS index_factory string ("" for BM25)
    kb_fingerprint: str
    kb_dir: str  # absolute path of the KB the index was built from (image thumbnails are read there)
    count: int  # number of indexed records
    built_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    build_seconds: float = 0.0
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)  # e.g. query/passage prefixes of the text encoder

    def save(self, index_dir: Path) -> None:
        (index_dir / MANIFEST_FILE).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, index_dir: Path) -> Manifest:
        path = index_dir / MANIFEST_FILE
        if not path.is_file():
            raise IndexLoadError(f"{index_dir} has no {MANIFEST_FILE}; build it with `mmsearch index build`")
        data = json.loads(path.read_text())
        if data.get("format_version") != FORMAT_VERSION:
            raise IndexLoadError(
                f"{index_dir} has index format {data.get('format_version')}, this version reads {FORMAT_VERSION}; rebuild it"
            )
        return cls(**data)

    def check_encoder(self, index_dir: Path, name: str, version: str, dim: int) -> None:
        """Raise unless the encoder has the weights (version) and dim this index was built with.

        Names are compared only in the message: the same weights under another name or path are fine.
        """
        if (version, dim) != (self.encoder_version, self.dim):
            raise IndexLoadError(
                f"index {index_dir} was built with encoder {self.encoder!r} (version {self.encoder_version}, "
                f"dim {self.dim}) but the configured encoder is {name!r} (version {version}, dim {dim}); "
                f"rebuild the index with this encoder, or configure {self.encoder!r}"
            )
