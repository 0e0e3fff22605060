"""Index dirs: BM25 and dense passage indexes, CLIP image index, each with a manifest."""
