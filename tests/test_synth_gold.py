"""Gold-trajectory wording (terse) and the no-leakage rule for what trains the policy.

What the tiny policy's training sees, and what these tests check:
- its tokenizer: the KB's own text (passages, image captions, entity names, aliases and facts: the
  whole KB, every split's entities) plus the protocol's text (system prompt, tags); nothing from a
  dataset, so no question, answer or split decides a merge;
- its SFT rows (train split): no message, tool results included, names a validation or test entity.
Held-out entities are re-derived here from `entities.jsonl` and the split partition as plain JSON.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from data_pipeline.synth import templates as T
from data_pipeline.synth.config import GoldConfig, SynthConfig
from data_pipeline.synth.graph import EntityGraph
from data_pipeline.synth.run import run_synth
from data_pipeline.synth.splits import partition_entities
from mmsearch.protocols.qwen_tools import parse_action

ROOT = Path(__file__).parents[1]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "work" / "examples.jsonl").read_text().splitlines()]


def _texts(messages: list[dict]):
    for m in messages:
        content = m["content"]
        yield from ([content] if isinstance(content, str) else [p["text"] for p in content if p.get("text")])


def _held_out_names(world_dir: Path, cfg: SynthConfig) -> set[str]:
    parts = partition_entities(EntityGraph.load(world_dir), cfg.splits, cfg.seed)
    entities = {e["id"]: e for e in map(json.loads, (world_dir / "entities.jsonl").read_text().splitlines())}
    return {n for e in parts["validation"] | parts["test"] for n in [entities[e]["name"], *entities[e]["aliases"]]}


@pytest.fixture(scope="module")
def terse(world_dir: Path, toolbox, policy_dir: Path, tmp_path_factory) -> tuple[Path, SynthConfig]:
    out = tmp_path_factory.mktemp("synth") / "terse"
    cfg = SynthConfig(kb=str(world_dir), out=str(out), n=60, seed=1, chunk=32, processor=str(policy_dir),
                      gold=GoldConfig(think="terse", image_k=1, text_k=3, names_after_space=True))
    run_synth(cfg, toolbox=toolbox, progress=False)
    return out, cfg


def _holds(ids: list[int], part: list[int]) -> bool:
    return any(ids[i:i + len(part)] == part for i in range(len(ids) - len(part) + 1))


def test_terse_turns_are_short_and_queries_canonical(terse, policy_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy_dir)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    out, _ = terse
    rows = _rows(out)
    assert sum(r["requires_search"] for r in rows) >= 10
    for row in rows:
        turns = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assistants = [parse_action(turn) for turn in turns]
        assert all(a.is_valid for a in assistants)
        assert assistants[-1].kind == "answer" and assistants[-1].answer == row["answers"][0]
        assert assistants[-1].thinking == "answer"
        assert turns[-1].endswith(f"<answer> {row['answers'][0]}</answer>")  # the answer after a space
        calls = [a for a in assistants if a.kind == "tool_call"]
        texts = [a for a in calls if a.name == "text_search"]
        assert len(texts) == len(row["meta"].get("path", []))
        for call in calls:
            assert call.thinking in ("search image", "search text", f"crop {row['meta'].get('position')}")
            if call.name == "image_search":
                assert call.arguments["k"] == 1
        # each query is the canonical one for its hop: the relation's words, then the subject's name
        results = [m["content"][0]["text"] for m in row["messages"] if m["role"] == "tool"]
        for hop, call in zip(row["meta"].get("path", []), texts):
            assert call.arguments["k"] == 3
            words = T.canonical_query(hop["relation"], "", hop["entity"] is None, name_last=True)
            assert words.endswith(" ") and call.arguments["query"].startswith(words)
            subject = call.arguments["query"][len(words):]
            assert any(subject in r for r in results)  # the name was in an earlier tool result
            # ... and the policy writes it with the very tokens that result holds (a name after `"` would not)
            turn = next(t for t in turns if subject in t)
            assert _holds(ids(turn), ids(" " + subject)) and any(_holds(ids(r), ids(" " + subject)) for r in results)
            assert not _holds(ids(f'"{subject}'), ids(" " + subject)[:1])


@pytest.mark.parametrize("which", ["terse", "full"])
def test_training_rows_name_no_held_out_entity(which, terse, gold_dataset: Path, world_dir: Path):
    out, cfg = terse if which == "terse" else (gold_dataset, SynthConfig(seed=1))
    names = _held_out_names(world_dir, cfg)
    pattern = re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, sorted(names, key=len, reverse=True))) + r")(?!\w)",
                         re.IGNORECASE)
    train = [r for r in _rows(out) if r["split"] == "train"]
    assert train
    for row in train:
        for text in _texts(row["messages"]):
            assert not pattern.search(text), (row["id"], pattern.search(text).group(0))


def test_question_words_are_whole_tokens_of_the_tiny_policy(policy_dir: Path):
    """With the pipeline's question wording in its text, the 1,000-token tokenizer keeps question
    words whole (trained on the KB and protocol alone it wrote "How many" as 'H', 'ow', ' ma', 'n', 'y')."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy_dir)
    for word in ("How", " many", " colour", " flag", " emblem", " bottom", " kind", " picture"):
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    assert len(tok("How many pictures are in the image?")["input_ids"]) == 8


@pytest.mark.parametrize("prompt", ["schema", "tiny.yaml"])
def test_tokenizer_sees_only_kb_protocol_and_entity_free_question_text(world_dir: Path, prompt: str):
    """Every text the tokenizer trains on is the protocol's (with the system prompt the policy is served:
    the schema prompt, or the short one configs/model/tiny.yaml records), made of one KB file's own
    words, or a question in the pipeline's wording that names no entity."""
    from omegaconf import OmegaConf

    from data_pipeline.synth.templates import sample_questions
    from mmsearch.model.tiny import TinyPolicyConfig, _kb_texts
    from mmsearch.protocols.qwen_tools import tool_prompt_examples

    system_prompt = "" if prompt == "schema" else OmegaConf.load(ROOT / "configs" / "model" / "tiny.yaml").system_prompt
    protocol = set(tool_prompt_examples(system_prompt))
    assert any("<tools>" in text for text in protocol) == (prompt == "schema")
    n_questions = TinyPolicyConfig().wording_questions
    questions = set(sample_questions(n_questions))
    assert n_questions and len(questions) > 100
    names = {form for record in map(json.loads, (world_dir / "entities.jsonl").read_text().splitlines())
             for form in [record["name"], *record.get("aliases", [])]}
    assert not [q for q in questions if any(re.search(rf"\b{re.escape(n)}\b", q) for n in names)]
    kb_words = set()
    for name in ("passages.jsonl", "images.jsonl", "entities.jsonl"):
        for record in map(json.loads, (world_dir / name).read_text().splitlines()):
            values = [record.get("title", ""), record.get("text", ""), record.get("name", ""), *record.get("aliases", []),
                      *(f"{k}: {v}" for k, v in record.get("facts", {}).items())]
            kb_words |= {w for v in values for w in v.split()}
    texts = list(_kb_texts(world_dir, n_questions, system_prompt))
    assert set(texts) & protocol and set(texts) & questions
    for text in texts:
        assert text in protocol or text in questions or set(text.split()) <= kb_words, text[:80]


@pytest.mark.parametrize("think", ["terse", "full"])
def test_read_crops_crop_the_named_cell_before_answering(world_dir: Path, toolbox, policy_dir: Path, tmp_path, think):
    """With scenes.read_crops, picture and colour questions crop the grid cell they name (one box per
    position word, in the policy's pixels), then answer; count and position questions answer at once."""
    from data_pipeline.synth.config import MixConfig, SceneConfig

    out = tmp_path / "read_crops"
    cfg = SynthConfig(kb=str(world_dir), out=str(out), n=40, seed=1, chunk=32, processor=str(policy_dir),
                      mix=MixConfig(search_free=1.0), scenes=SceneConfig(read_crops=True),
                      gold=GoldConfig(think=think, image_k=1, text_k=3, names_after_space=True))
    run_synth(cfg, toolbox=toolbox, progress=False)
    rows = _rows(out)
    boxes: dict[str, set[str]] = {}
    for row in rows:
        messages = row["messages"] if isinstance(row["messages"], list) else json.loads(row["messages"])
        turns = [parse_action(m["content"]) for m in messages if m["role"] == "assistant"]
        assert turns[-1].kind == "answer" and turns[-1].answer == row["answers"][0]
        if row["kind"] in ("picture", "colour"):
            assert [t.kind for t in turns] == ["tool_call", "answer"] and turns[0].name == "crop"
            position = next(p for p in sorted(T.POSITION_WORDS, key=len, reverse=True) if p in row["question"])
            boxes.setdefault(position, set()).add(json.dumps(turns[0].arguments["bbox"]))
            tool = next(m for m in messages if m["role"] == "tool")
            assert sum(p["type"] == "image" for p in tool["content"]) == 1  # the crop came back as image 1
        else:
            assert [t.kind for t in turns] == ["answer"]
    assert boxes and all(len(b) == 1 for b in boxes.values()), boxes  # one box per position word
