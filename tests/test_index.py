"""Index builds over the world KB: manifests, search modes, FAISS types, encoder checks, the cache."""

import json

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

from tools.config import IndexBuildConfig, TextEncoderConfig
from tools.encoders.text import resolve_model_path
from tools.index.build import build_indexes
from tools.index.manifest import IndexLoadError, Manifest
from tools.kb import KB
from tools.search.cache import CachedSearch
from tools.search.local import LocalSearch


def test_manifests_describe_the_build(index_dir, world_dir):
    kb = KB(world_dir)
    n_passages = sum(1 for _ in kb.passages())
    n_images = sum(1 for _ in kb.images())
    bm25, dense, image = (Manifest.load(index_dir / kind) for kind in ("bm25", "dense", "image"))
    assert (bm25.kind, dense.kind, image.kind) == ("bm25", "dense_text", "clip_image")
    assert bm25.count == dense.count == n_passages and image.count == n_images
    assert dense.dim == 384 and dense.faiss_factory == "Flat"
    assert {bm25.kb_fingerprint, dense.kb_fingerprint, image.kb_fingerprint} == {kb.fingerprint()}


@pytest.mark.parametrize("mode", ["bm25", "dense", "hybrid"])
def test_text_modes_find_an_entity_by_name(search, world_dir, mode):
    entities = [json.loads(line) for line in (world_dir / "entities.jsonl").read_text().splitlines()[:5]]
    results = search.text_search([e["name"] for e in entities], k=5, mode=mode)
    found = sum(any(hit.entity_id == e["id"] for hit in hits) for e, hits in zip(entities, results))
    assert found >= 4, f"{mode}: only {found}/5 entities found by name"
    for hits in results:
        assert len(hits) <= 5 and [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_queries_with_no_known_words_have_no_bm25_hits(search):
    assert search.text_search(["zzqxv qqqzz", "the of and"], k=5, mode="bm25") == [[], []]


def test_k_larger_than_the_kb_is_fine(search):
    (hits,) = search.text_search(["capital"], k=10**6, mode="bm25")
    assert 0 < len(hits) <= search.manifests["bm25"].count


@pytest.fixture(scope="module")
def small_kb(world_dir, tmp_path_factory):
    """The world's first 80 passages: enough to train a small IVF, quick to dense-encode."""
    kb = tmp_path_factory.mktemp("small_kb")
    lines = (world_dir / "passages.jsonl").read_text().splitlines(keepends=True)
    (kb / "passages.jsonl").write_text("".join(lines[:80]))
    return kb


@pytest.mark.parametrize("factory", ["IVF4,Flat", "HNSW16"])
def test_other_faiss_types_build_by_streaming(small_kb, tmp_path, factory):
    cfg = IndexBuildConfig(kb=str(small_kb), out=str(tmp_path), bm25=False, image=False,
                           text_faiss=factory, faiss_train_size=64)
    build_indexes(cfg, progress=False)
    search = LocalSearch(tmp_path, device="cpu")
    assert search.manifests["dense"].faiss_factory == factory
    assert search.manifests["dense"].count == 80
    (hits,) = search.text_search(["a nation and its capital city"], k=3, mode="dense")
    assert len(hits) == 3


def test_bad_faiss_settings_are_clear_errors(small_kb, tmp_path):
    with pytest.raises(ValueError, match="bad FAISS factory string 'Nonsense9'"):
        build_indexes(IndexBuildConfig(kb=str(small_kb), out=str(tmp_path), bm25=False, image=False,
                                       text_faiss="Nonsense9"), progress=False)
    with pytest.raises(ValueError, match="could not be trained"):
        build_indexes(IndexBuildConfig(kb=str(small_kb), out=str(tmp_path), bm25=False, image=False,
                                       text_faiss="IVF65536,Flat"), progress=False)
    assert not (tmp_path / "dense").exists()  # a failed build leaves nothing that looks usable


@pytest.fixture(scope="module")
def perturbed_encoder(tmp_path_factory):
    """The same architecture with one weight changed: a different encoder under the same shape."""
    out = tmp_path_factory.mktemp("minilm_perturbed")
    path = resolve_model_path(TextEncoderConfig().name)
    model, tokenizer = AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight[100] += 0.5
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_wrong_encoder_for_the_index_is_a_clear_error(text_index_dir, perturbed_encoder, tmp_path):
    with pytest.raises(IndexLoadError, match="was built with encoder .* but the configured encoder is"):
        LocalSearch(text_index_dir, device="cpu", text_encoder=TextEncoderConfig(name=str(perturbed_encoder)))
    # Another width entirely: the message names both dims.
    small = tmp_path / "bert_small"
    BertModel(BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=128)).save_pretrained(small)
    AutoTokenizer.from_pretrained(resolve_model_path(TextEncoderConfig().name)).save_pretrained(small)
    with pytest.raises(IndexLoadError, match="dim 384.*dim 64"):
        LocalSearch(text_index_dir, device="cpu", text_encoder=TextEncoderConfig(name=str(small)))


def test_missing_or_empty_index_dirs(tmp_path):
    with pytest.raises(IndexLoadError, match="not found"):
        LocalSearch(tmp_path / "nope")
    with pytest.raises(IndexLoadError, match="holds no index"):
        LocalSearch(tmp_path)


def test_bad_kb_records_are_skipped_and_counted(world_dir, tmp_path):
    kb_dir = tmp_path / "kb"
    kb_dir.mkdir()
    lines = (world_dir / "passages.jsonl").read_text().splitlines()[:20]
    lines[3] = "{not json"
    lines[7] = json.dumps({"id": "p-no-text", "title": "x"})
    (kb_dir / "passages.jsonl").write_text("\n".join(lines) + "\n")
    built = build_indexes(IndexBuildConfig(kb=str(kb_dir), out=str(tmp_path / "idx"), dense=False, image=False),
                          progress=False)
    assert built["bm25"]["count"] == 18
    assert built["bm25"]["extra"]["skipped"] == {"passages.jsonl": 2}


def test_cache_serves_repeats_and_keys_on_the_fingerprint(search, tmp_path):
    cached = CachedSearch(search, tmp_path / "cache")
    first = cached.text_search(["capital city", "river"], k=3, mode="bm25")
    again = cached.text_search(["capital   city", "river"], k=3, mode="bm25")  # whitespace-normalised key
    assert (cached.misses, cached.hits) == (2, 2)
    assert [[h.id for h in hits] for hits in first] == [[h.id for h in hits] for hits in again]
    cached.text_search(["capital city"], k=4, mode="bm25")  # another k is another key
    assert cached.misses == 3
    cached.close()


def test_batched_encoding_matches_one_at_a_time(search):
    """Texts are encoded in length-sorted batches; each row must still be its own text's embedding."""
    encoder = search._dense.encoder
    texts = ["a", "a much longer passage about the capital city of a nation and its rivers", "river", "x y z"]
    batched = encoder.encode(texts)
    singles = [encoder.encode([t])[0] for t in texts]
    for row, single in zip(batched, singles):
        assert abs(row - single).max() < 1e-5
