"""FAISS indexes from a factory string, built from streamed batches, on GPU when faiss-gpu is there.

Vectors are L2-normalised by the encoders and searched by inner product (= cosine similarity).
Indexes that need training (IVF, PQ) are trained on the first `train_size` vectors streamed in;
the rest are added as they come, so building never holds the whole corpus's vectors at once.
"""

from __future__ import annotations

import logging
from pathlib import Path

import faiss
import numpy as np

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def to_gpu_if_available(index: faiss.Index, use_gpu: bool) -> faiss.Index:
    if not (use_gpu and gpu_available()):
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except RuntimeError as exc:  # some index types (e.g. HNSW) have no GPU version
        logger.warning("FAISS index stays on CPU: %s", exc)
        return index


class FaissBuilder:
    """Accumulates batches into an index, training it first when the index type needs it."""

    def __init__(self, dim: int, factory: str, train_size: int = 50_000, use_gpu: bool = True):
        try:
            self.index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise ValueError(f"bad FAISS factory string {factory!r}: {str(exc).strip().splitlines()[-1]}") from None
        self.factory = factory
        self.train_size = train_size
        self.use_gpu = use_gpu
        self._pending: list[np.ndarray] = []
        self._pending_count = 0
        if self.index.is_trained:
            self.index = to_gpu_if_available(self.index, use_gpu)

    def add(self, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if self.index.is_trained:
            self.index.add(vectors)
            return
        self._pending.append(vectors)
        self._pending_count += len(vectors)
        if self._pending_count >= self.train_size:
            self._train_and_flush()

    def finish(self) -> faiss.Index:
        """The finished index, on CPU (ready to save)."""
        if not self.index.is_trained:
            self._train_and_flush()
        return faiss.index_gpu_to_cpu(self.index) if gpu_available() and self.use_gpu else self.index

    def _train_and_flush(self) -> None:
        sample = np.concatenate(self._pending) if self._pending else np.zeros((0, self.index.d), np.float32)
        try:
            self.index.train(sample)
        except RuntimeError as exc:
            raise ValueError(
                f"FAISS index {self.factory!r} could not be trained on {len(sample)} vectors "
                f"({str(exc).strip().splitlines()[-1]}); use fewer IVF lists or 'Flat' for small KBs"
            ) from None
        self.index = to_gpu_if_available(self.index, self.use_gpu)
        for batch in self._pending:
            self.index.add(batch)
        self._pending, self._pending_count = [], 0


def save_index(index: faiss.Index, index_dir: Path) -> None:
    faiss.write_index(index, str(index_dir / INDEX_FILE))


def load_index(index_dir: Path, use_gpu: bool = True) -> faiss.Index:
    return to_gpu_if_available(faiss.read_index(str(index_dir / INDEX_FILE)), use_gpu)
