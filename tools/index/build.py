"""`mmsearch index build`: BM25, dense text and CLIP image indexes for a KB dir.

Each index is written to `<out>/<kind>.tmp` and renamed into place once complete, so a killed
build never leaves an index that looks usable. Records stream through in batches: the docstore and
FAISS grow batch by batch; only BM25's token ids (small ints) are held until the end.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import bm25s
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from tools.config import IndexBuildConfig
from tools.index.docstore import DocStoreWriter
from tools.index.faiss_store import FaissBuilder, save_index
from tools.index.manifest import Manifest
from tools.kb import KB

logger = logging.getLogger(__name__)

BM25_DIR, DENSE_DIR, IMAGE_DIR = "bm25", "dense", "image"
BATCH = 1024


def build_indexes(cfg: IndexBuildConfig, progress: bool = True) -> dict:
    """Build the indexes `cfg` asks for; returns {kind: manifest dict}."""
    kb = KB(cfg.kb)
    kb_fingerprint = kb.fingerprint()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    built = {}
    if cfg.bm25:
        built[BM25_DIR] = _build(out / BM25_DIR, lambda d: _build_bm25(kb, kb_fingerprint, d, progress))
    if cfg.dense:
        built[DENSE_DIR] = _build(out / DENSE_DIR, lambda d: _build_dense(kb, kb_fingerprint, cfg, d, progress))
    if cfg.image:
        built[IMAGE_DIR] = _build(out / IMAGE_DIR, lambda d: _build_image(kb, kb_fingerprint, cfg, d, progress))
    for name, report in kb.skips.items():
        if report.skipped:
            for manifest in built.values():
                manifest.extra.setdefault("skipped", {})[name] = report.skipped
    return {kind: vars(m) for kind, m in built.items()}


def _build(final_dir: Path, build_into) -> Manifest:
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    manifest: Manifest = build_into(tmp)
    manifest.build_seconds = round(time.perf_counter() - start, 3)
    manifest.save(tmp)
    shutil.rmtree(final_dir, ignore_errors=True)
    tmp.rename(final_dir)
    return manifest


def _batches(items: Iterable, size: int = BATCH) -> Iterator[list]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def _portable_name(name: str) -> str:
    """Encoder names that are local dirs are stored absolute, so the index loads from any cwd."""
    return str(Path(name).resolve()) if Path(name).is_dir() else name


def bm25_tokenizer() -> bm25s.tokenization.Tokenizer:
    return bm25s.tokenization.Tokenizer(stopwords="en")


def _passage_doc(p) -> dict:
    return {"id": p.id, "title": p.title, "text": p.text, "entity_id": p.entity_id}


def _build_bm25(kb: KB, kb_fingerprint: str, out: Path, progress: bool) -> Manifest:
    tokenizer, docs = bm25_tokenizer(), DocStoreWriter(out)
    token_ids: list[list[int]] = []
    for batch in _batches(tqdm(kb.passages(), desc="bm25", unit=" passages", disable=not progress)):
        for p in batch:
            docs.add(_passage_doc(p))
        # Titles are indexed with the text: passages often name their entity only in the title.
        token_ids += tokenizer.tokenize(
            [f"{p.title}\n{p.text}" for p in batch], update_vocab=True, return_as="ids", show_progress=False
        )
    count = docs.close()
    if count == 0:
        raise ValueError(f"{kb.root} has no passages to index")
    retriever = bm25s.BM25()
    retriever.index(token_ids, show_progress=False)
    # An index built from token ids has int vocab keys. bm25s saves with orjson when it is installed (Gradio
    # brings it), which refuses them; the stdlib json it uses otherwise wrote them as strings: so do we.
    retriever.vocab_dict = {str(k): v for k, v in retriever.vocab_dict.items()}
    retriever.save(out, show_progress=False)
    tokenizer.save_vocab(out)
    tokenizer.save_stopwords(out)
    return Manifest(
        kind="bm25", encoder="bm25s", encoder_version=bm25s.__version__, dim=0, faiss_factory="",
        kb_fingerprint=kb_fingerprint, kb_dir=str(kb.root.resolve()), count=count,
    )


def _build_dense(kb: KB, kb_fingerprint: str, cfg: IndexBuildConfig, out: Path, progress: bool) -> Manifest:
    from tools.encoders.text import TextEncoder

    encoder = TextEncoder(cfg.text_encoder, cfg.device)
    docs = DocStoreWriter(out)
    faiss_builder = FaissBuilder(encoder.dim, cfg.text_faiss, cfg.faiss_train_size, cfg.use_faiss_gpu)
    for batch in _batches(tqdm(kb.passages(), desc="dense", unit=" passages", disable=not progress)):
        for p in batch:
            docs.add(_passage_doc(p))
        faiss_builder.add(encoder.encode_passages([f"{p.title}\n{p.text}" for p in batch]))
    count = docs.close()
    if count == 0:
        raise ValueError(f"{kb.root} has no passages to index")
    save_index(faiss_builder.finish(), out)
    return Manifest(
        kind="dense_text", encoder=_portable_name(encoder.name), encoder_version=encoder.version, dim=encoder.dim,
        faiss_factory=cfg.text_faiss, kb_fingerprint=kb_fingerprint, kb_dir=str(kb.root.resolve()),
        count=count,
        extra={
            "query_prefix": cfg.text_encoder.query_prefix,
            "passage_prefix": cfg.text_encoder.passage_prefix,
            "max_length": cfg.text_encoder.max_length,
        },
    )


def _build_image(kb: KB, kb_fingerprint: str, cfg: IndexBuildConfig, out: Path, progress: bool) -> Manifest:
    from tools.encoders.clip import load_image_encoder

    encoder = load_image_encoder(cfg.image_encoder, cfg.device)
    docs = DocStoreWriter(out)
    faiss_builder = FaissBuilder(encoder.dim, cfg.image_faiss, cfg.faiss_train_size, cfg.use_faiss_gpu)
    unreadable = 0
    for batch in _batches(tqdm(kb.images(), desc="image", unit=" images", disable=not progress)):
        images = []
        for record in batch:
            try:
                with Image.open(kb.image_path(record)) as img:
                    images.append(img.convert("RGB"))
            except (OSError, UnidentifiedImageError) as exc:
                unreadable += 1
                logger.warning("skipping unreadable image %s: %s", record.path, exc)
                continue
            docs.add({"id": record.id, "title": record.title, "text": record.text,
                      "entity_id": record.entity_id, "path": record.path})
        if images:
            faiss_builder.add(encoder.encode(images))
    count = docs.close()
    if count == 0:
        raise ValueError(f"{kb.root} has no readable images to index")
    save_index(faiss_builder.finish(), out)
    extra = {"image_encoder_pretrained": cfg.image_encoder.pretrained}
    if unreadable:
        extra["unreadable_images"] = unreadable
    return Manifest(
        kind="clip_image", encoder=_portable_name(encoder.name), encoder_version=encoder.version, dim=encoder.dim,
        faiss_factory=cfg.image_faiss, kb_fingerprint=kb_fingerprint, kb_dir=str(kb.root.resolve()),
        count=count, extra=extra,
    )
