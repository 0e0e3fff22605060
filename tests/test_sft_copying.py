"""Copy rows for SFT (mmsearch/sft/copying.py): random vocabulary ids, each string followed by itself."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from mmsearch.sft.config import SFTConfig
from mmsearch.sft.copying import CopyRowsConfig, copy_rows, copyable_ids


@pytest.fixture(scope="module")
def tokenizer(policy_dir):
    return AutoTokenizer.from_pretrained(policy_dir)


def test_a_copy_row_is_a_string_twice_trained_on_the_second_reading(tokenizer):
    rows = copy_rows(tokenizer, CopyRowsConfig(rows=50, min_len=3, max_len=9), seed=0)
    assert len(rows) == 50
    allowed = set(copyable_ids(tokenizer))
    lengths = set()
    for row in rows:
        n = len(row.token_ids) // 2
        string = row.token_ids[:n]
        assert row.token_ids == string + string and not row.images
        assert set(string) <= allowed and 3 <= n <= 9
        # trained: every id of the second reading but its first (nothing before it predicts it)
        assert row.loss_mask == [0] * (n + 1) + [1] * (n - 1) and len(row.logprobs) == 2 * n
        lengths.add(n)
    assert len(lengths) >= 5  # random lengths: no fixed offset copies them


def test_copy_rows_cover_the_whole_vocabulary_but_control_tokens_and_repeat_by_seed(tokenizer):
    ids = copyable_ids(tokenizer)
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    assert len(ids) == len(tokenizer) - len(special) and not special & set(ids)
    assert tokenizer.convert_tokens_to_ids("<tool_call>") in special
    cfg = CopyRowsConfig(rows=2 * len(ids) // 10, min_len=20, max_len=20)
    rows = copy_rows(tokenizer, cfg, seed=3)
    seen = {t for row in rows for t in row.token_ids}
    assert len(seen) > 0.95 * len(ids)  # ~4 draws per id: every id gets trained, not just the KB's frequent ones
    again = copy_rows(tokenizer, cfg, seed=3)
    assert [r.token_ids for r in again] == [r.token_ids for r in rows]
    assert [r.token_ids for r in copy_rows(tokenizer, cfg, seed=4)] != [r.token_ids for r in rows]


def test_copy_rows_config_is_checked():
    with pytest.raises(ValueError, match="min_len"):
        CopyRowsConfig(rows=5, min_len=10, max_len=4).check()
    cfg = SFTConfig()
    cfg.copy_rows.rows = -1
    with pytest.raises(ValueError, match="copy_rows"):
        cfg.check()
