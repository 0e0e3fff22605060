"""In-process search over an index dir (whichever of bm25/, dense/, image/ it holds).

Encoders are chosen by the manifests. A caller that names its own encoder gets it checked against
the manifest, and a mismatch is an `IndexLoadError` rather than silent garbage.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import bm25s
import numpy as np
from PIL import Image

from tools.config import ImageEncoderConfig, TextEncoderConfig
from tools.index.build import BM25_DIR, DENSE_DIR, IMAGE_DIR, bm25_tokenizer
from tools.index.docstore import DocStore
from tools.index.faiss_store import load_index
from tools.index.manifest import IndexLoadError, Manifest
from tools.search.types import Hit, TextMode

RRF_K = 60  # the constant from the reciprocal-rank-fusion paper; robust across retrievers
FUSION_DEPTH = 20  # each retriever contributes its top max(k, FUSION_DEPTH) to the fusion
THUMBNAIL_PX = 96


class LocalSearch:
    def __init__(
        self,
        index_dir: str | Path,
        device: str = "auto",
        text_encoder: TextEncoderConfig | None = None,
        image_encoder: ImageEncoderConfig | None = None,
        default_mode: TextMode = "hybrid",
        use_faiss_gpu: bool = True,
    ):
        self.root = Path(index_dir)
        if not self.root.is_dir():
            raise IndexLoadError(f"index dir not found: {self.root}")
        self.default_mode = default_mode
        self.manifests: dict[str, Manifest] = {}
        self._bm25 = self._dense = self._image = None
        if (self.root / BM25_DIR).is_dir():
            self._bm25 = _Bm25(self.root / BM25_DIR)
            self.manifests[BM25_DIR] = self._bm25.manifest
        if (self.root / DENSE_DIR).is_dir():
            self._dense = _DenseText(self.root / DENSE_DIR, text_encoder, device, use_faiss_gpu)
            self.manifests[DENSE_DIR] = self._dense.manifest
        if (self.root / IMAGE_DIR).is_dir():
            self._image = _ClipImage(self.root / IMAGE_DIR, image_encoder, device, use_faiss_gpu)
            self.manifests[IMAGE_DIR] = self._image.manifest
        if not self.manifests:
            raise IndexLoadError(f"{self.root} holds no index ({BM25_DIR}/, {DENSE_DIR}/ or {IMAGE_DIR}/)")
        digest = hashlib.sha256()
        for kind in sorted(self.manifests):
            m = self.manifests[kind]
            digest.update(f"{kind}:{m.kb_fingerprint}:{m.encoder}:{m.encoder_version}:{m.built_at}".encode())
        self._fingerprint = digest.hexdigest()[:16]

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def text_modes(self) -> list[str]:
        modes = [m for m, ok in (("bm25", self._bm25), ("dense", self._dense)) if ok]
        return modes + (["hybrid"] if len(modes) == 2 else [])

    @property
    def has_image_search(self) -> bool:
        return self._image is not None

    def text_search(self, queries: list[str], k: int, mode: TextMode | None = None) -> list[list[Hit]]:
        mode = mode or self.default_mode
        if mode not in self.text_modes:
            raise ValueError(f"text search mode {mode!r} needs an index {self.root} does not have (it has: {self.text_modes})")
        if not queries:
            return []
        if mode == "bm25":
            return self._bm25.search(queries, k)
        if mode == "dense":
            return self._dense.search(queries, k)
        depth = max(k, FUSION_DEPTH)
        return [
            _rrf([lexical, semantic], k)
            for lexical, semantic in zip(self._bm25.search(queries, depth), self._dense.search(queries, depth))
        ]

    def image_search(self, images: list[Image.Image], k: int, thumbnails: bool = False) -> list[list[Hit]]:
        if self._image is None:
            raise ValueError(f"{self.root} has no image index; build it with `mmsearch index build`")
        if not images:
            return []
        return self._image.search(images, k, thumbnails)


def _rrf(rankings: list[list[Hit]], k: int) -> list[Hit]:
    """Reciprocal-rank fusion: sum of 1/(RRF_K + rank) over the rankings a passage appears in."""
    fused: dict[str, Hit] = {}
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, hit in enumerate(ranking, 1):
            fused.setdefault(hit.id, hit)
            scores[hit.id] = scores.get(hit.id, 0.0) + 1.0 / (RRF_K + rank)
    order = sorted(scores, key=lambda doc_id: (-scores[doc_id], doc_id))[:k]
    return [Hit(**{**vars(fused[i]), "score": round(scores[i], 6)}) for i in order]


def _hit(doc: dict, score: float) -> Hit:
    return Hit(
        id=doc["id"], title=doc["title"], text=doc["text"], score=float(score),
        entity_id=doc.get("entity_id"), path=doc.get("path"),
    )


class _Bm25:
    def __init__(self, path: Path):
        self.manifest = Manifest.load(path)
        self.docs = DocStore(path)
        self.retriever = bm25s.BM25.load(path, mmap=True, show_progress=False)
        self.tokenizer = bm25_tokenizer()
        self.tokenizer.load_vocab(path)
        self.tokenizer.load_stopwords(path)

    def search(self, queries: list[str], k: int) -> list[list[Hit]]:
        k = min(k, len(self.docs))
        token_ids = self.tokenizer.tokenize(queries, update_vocab=False, return_as="ids", show_progress=False)
        return [self._top_k(ids, k) if ids and k > 0 else [] for ids in token_ids]

    def _top_k(self, token_ids: list[int], k: int) -> list[Hit]:
        # Scoring plus our own top-k: bm25s's `retrieve` wraps the same scoring in ~2 ms of
        # per-call bookkeeping, more than the scoring itself costs on 100k passages.
        scores = self.retriever.get_scores_from_ids(token_ids)
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        top = top[np.lexsort((top, -scores[top]))]  # best first; ties by row, so results are deterministic
        # A passage sharing no word with the query scores 0: it is not a hit.
        return [_hit(self.docs[int(row)], scores[row]) for row in top if scores[row] > 0]


class _FaissSearch:
    """FAISS + docstore; subclasses say how queries become vectors."""

    def __init__(self, path: Path, use_faiss_gpu: bool):
        self.manifest = Manifest.load(path)
        self.docs = DocStore(path)
        self.index = load_index(path, use_faiss_gpu)
        # Encoders are not re-entrant on every backend; one lock keeps concurrent callers safe.
        self.lock = threading.Lock()

    def _search_vectors(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        k = min(k, self.index.ntotal)
        scores, rows = self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
        return [[_hit(self.docs[int(r)], s) for r, s in zip(row, sc) if r >= 0] for row, sc in zip(rows, scores)]


class _DenseText(_FaissSearch):
    def __init__(self, path: Path, cfg: TextEncoderConfig | None, device: str, use_faiss_gpu: bool):
        super().__init__(path, use_faiss_gpu)
        from tools.encoders.text import TextEncoder

        m = self.manifest
        if cfg is None:
            cfg = TextEncoderConfig(
                name=m.encoder, query_prefix=m.extra.get("query_prefix", ""),
                passage_prefix=m.extra.get("passage_prefix", ""), max_length=m.extra.get("max_length", 256),
            )
        self.encoder = TextEncoder(cfg, device)
        m.check_encoder(path, self.encoder.name, self.encoder.version, self.encoder.dim)

    def search(self, queries: list[str], k: int) -> list[list[Hit]]:
        with self.lock:
            vectors = self.encoder.encode_queries(queries)
        return self._search_vectors(vectors, k)


class _ClipImage(_FaissSearch):
    def __init__(self, path: Path, cfg: ImageEncoderConfig | None, device: str, use_faiss_gpu: bool):
        super().__init__(path, use_faiss_gpu)
        from tools.encoders.clip import load_image_encoder

        m = self.manifest
        if cfg is None:
            cfg = ImageEncoderConfig(name=m.encoder, pretrained=m.extra.get("image_encoder_pretrained", ""))
        self.encoder = load_image_encoder(cfg, device)
        m.check_encoder(path, self.encoder.name, self.encoder.version, self.encoder.dim)
        self.kb_dir = Path(m.kb_dir)

    def search(self, images: list[Image.Image], k: int, thumbnails: bool) -> list[list[Hit]]:
        with self.lock:
            vectors = self.encoder.encode([img.convert("RGB") for img in images])
        results = self._search_vectors(vectors, k)
        if thumbnails:
            for hit in (h for hits in results for h in hits):
                hit.thumbnail = self._thumbnail(hit.path)
        return results

    def _thumbnail(self, rel_path: str) -> Image.Image | None:
        try:
            with Image.open(self.kb_dir / rel_path) as img:
                thumb = img.convert("RGB")
            thumb.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            return thumb
        except OSError:
            return None  # the KB moved: results stay useful without the picture
