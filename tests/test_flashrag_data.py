"""FlashRAG / Search-R1 QA files as text-only eval examples, and the per-dataset report Search-R1 quotes.

The fixtures are written here in FlashRAG's format (`id`, `question`, `golden_answers`, `metadata`)
and in Search-R1's processed parquet (the same columns plus `data_source`, `prompt`,
`reward_model`, ...), with good records and bad ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmsearch.eval.loaders import dataset_name, load_examples
from mmsearch.eval.report import compare, markdown, summarize
from mmsearch.example import Example

NQ = [
    {"id": "test_0", "question": "who wrote hamlet", "golden_answers": ["William Shakespeare", "Shakespeare"],
     "metadata": {"source": "wiki"}},
    {"id": "test_1", "question": "  capital of france? ", "golden_answers": ["Paris", "Paris"]},
    {"id": "test_2", "question": "", "golden_answers": ["x"]},
    {"id": "test_3", "question": "no gold?", "golden_answers": []},
    '{"id": "test_4", "question": ',
    {"id": "test_1", "question": "again?", "golden_answers": ["y"]},
    {"id": "test_6", "question": "bad gold?", "golden_answers": [{"text": "x"}]},
    {"id": "test_7", "question": "no gold key?"},  # read as a generic record: no answers either way
]
BAMBOOGLE = [  # the same ids as NQ's: FlashRAG numbers every dataset alike
    {"id": "test_0", "question": "Who was president when the telephone was patented?",
     "golden_answers": ["Ulysses S. Grant"]},
    {"id": "test_1", "question": "How old was the inventor?", "golden_answers": [29]},
]
NQ_SKIPS = {"missing_question": 1, "missing_answers": 2, "malformed_json": 1, "duplicate_id": 1,
            "malformed_record": 1}


def _write_jsonl(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


@pytest.fixture
def flashrag_dir(tmp_path: Path) -> Path:
    """FlashRAG's layout: one folder per dataset with its split files (hotpotqa has no test split)."""
    root = tmp_path / "FlashRAG_datasets"
    _write_jsonl(root / "nq" / "test.jsonl", NQ)
    _write_jsonl(root / "nq" / "train.jsonl", [{"id": "train_0", "question": "train?", "golden_answers": ["t"]}])
    _write_jsonl(root / "bamboogle" / "test.jsonl", BAMBOOGLE)
    _write_jsonl(root / "hotpotqa" / "dev.jsonl", [{"id": "dev_0", "question": "hop?", "golden_answers": ["h"]}])
    return root


def test_flashrag_jsonl_file_is_text_only_and_counts_bad_records(tmp_path: Path):
    path = _write_jsonl(tmp_path / "nq-test.jsonl", NQ)
    examples, report = load_examples(str(path))
    assert [e.id for e in examples] == ["nq/test_0", "nq/test_1"]
    assert report.format == "jsonl" and report.loaded == 2 and report.skipped == NQ_SKIPS
    assert report.examples_of_skipped[0].startswith("line 3: missing_question")
    hamlet, paris = examples
    assert hamlet.question == "who wrote hamlet" and hamlet.answers == ["William Shakespeare", "Shakespeare"]
    assert hamlet.images == [] and paris.images == []
    assert hamlet.meta == {"metadata": {"source": "wiki"}, "dataset": "nq"}
    assert paris.question == "capital of france?" and paris.answers == ["Paris"]  # stripped, deduplicated
    assert (paris.kind, paris.hops, paris.requires_search) == ("", -1, None)


def test_flashrag_dir_loads_the_split_of_every_dataset_folder(flashrag_dir: Path, caplog):
    with caplog.at_level("WARNING", logger="mmsearch.eval.loaders"):
        examples, report = load_examples(str(flashrag_dir), split="test")
    assert [e.id for e in examples] == ["bamboogle/test_0", "bamboogle/test_1", "nq/test_0", "nq/test_1"]
    assert [e.meta["dataset"] for e in examples] == ["bamboogle", "bamboogle", "nq", "nq"]
    assert examples[1].answers == ["29"]
    assert report.format == "flashrag_dir" and report.loaded == 4 and report.skipped == NQ_SKIPS
    assert report.examples_of_skipped[0].startswith("nq/test.jsonl line 3: missing_question")
    assert "no test.jsonl in hotpotqa" in caplog.text

    dev, _ = load_examples(str(flashrag_dir), split="dev")
    assert [(e.id, e.meta["dataset"]) for e in dev] == [("hotpotqa/dev_0", "hotpotqa")]
    limited, _ = load_examples(str(flashrag_dir), split="test", limit=3)
    assert [e.id for e in limited] == ["bamboogle/test_0", "bamboogle/test_1", "nq/test_0"]
    with pytest.raises(ValueError, match=r"split 'validation'.*bamboogle, hotpotqa, nq"):
        load_examples(str(flashrag_dir), split="validation")

    # a file of the layout, named by its folder
    (one,), _ = load_examples(str(flashrag_dir / "hotpotqa" / "dev.jsonl"))
    assert one.id == "hotpotqa/dev_0" and one.meta["dataset"] == "hotpotqa"


def _search_r1_row(source: str, index: int, record: dict) -> dict:
    """A row of Search-R1's test.parquet: the FlashRAG record, its question ending in '?', plus verl's fields."""
    question = record["question"].strip()
    question += "" if question.endswith("?") else "?"
    return {
        "id": record["id"], "question": question, "golden_answers": record["golden_answers"],
        "data_source": source,
        "prompt": [{"role": "user", "content": f"Answer the given question. ... Question: {question}\n"}],
        "ability": "fact-reasoning",
        "reward_model": {"style": "rule", "ground_truth": {"target": record["golden_answers"]}},
        "extra_info": {"split": "test", "index": index},
    }


def test_search_r1_parquet_names_datasets_by_data_source(tmp_path: Path):
    rows = [_search_r1_row("nq", 0, NQ[0]), _search_r1_row("nq", 1, NQ[1]),
            _search_r1_row("nq", 2, {"id": "test_2", "question": "no gold", "golden_answers": []}),
            _search_r1_row("bamboogle", 0, {**BAMBOOGLE[0], "golden_answers": ["Ulysses S. Grant"]})]
    path = tmp_path / "test.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    examples, report = load_examples(str(path))
    assert [e.id for e in examples] == ["nq/test_0", "nq/test_1", "bamboogle/test_0"]
    assert report.format == "parquet" and report.skipped == {"missing_answers": 1}
    nq, _, bamboogle = examples
    assert nq.question == "who wrote hamlet?" and nq.answers == ["William Shakespeare", "Shakespeare"]
    assert nq.images == [] and bamboogle.meta["dataset"] == "bamboogle"
    # Search-R1's prompt template and reward_model (a copy of golden_answers) stay out of meta
    assert nq.meta == {"data_source": "nq", "ability": "fact-reasoning", "extra_info": {"split": "test", "index": 0},
                       "dataset": "nq"}


def test_dataset_name_rule():
    assert dataset_name(None, Path("data/nq-test.jsonl")) == "nq"
    assert dataset_name(None, Path("data/hotpotqa_dev.jsonl")) == "hotpotqa"
    assert dataset_name(None, Path("data/2wikimultihopqa.Validation.jsonl")) == "2wikimultihopqa"
    assert dataset_name(None, Path("data/popqa.jsonl")) == "popqa"
    assert dataset_name(None, Path("FlashRAG_datasets/musique/dev.jsonl")) == "musique"
    assert dataset_name(" triviaqa ", Path("data/nq-test.jsonl")) == "triviaqa"  # data_source wins
    assert dataset_name("", Path("data/nq-test.jsonl")) == "nq"


def test_text_only_needs_an_explicit_empty_image_list_outside_flashrag(tmp_path: Path):
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a.png")
    path = _write_jsonl(tmp_path / "mixed.jsonl", [
        {"id": "text", "question": "Text only?", "answer": "yes", "images": []},
        {"id": "absent", "question": "Image key missing?", "answer": "no"},
        {"id": "flash", "question": "With an image?", "golden_answers": ["red"], "image": "a.png"},
    ])
    examples, report = load_examples(str(path))
    assert [(e.id, len(e.images)) for e in examples] == [("text", 0), ("mixed/flash", 1)]
    assert report.skipped == {"missing_image": 1}
    assert examples[1].images[0].getpixel((0, 0)) == (1, 2, 3)


# --- the per-dataset report -------------------------------------------------------------------------

def _example(id: str, dataset: str | None) -> Example:
    return Example(id=id, question=f"{id}?", images=[], answers=["a"], meta={"dataset": dataset} if dataset else {})


EXAMPLES = {e.id: e for e in [
    _example("nq/test_0", "nq"), _example("nq/test_1", "nq"), _example("bamboogle/test_0", "bamboogle"),
    _example("plain", None),
]}


def _record(example_id: str, sample: int, em: float, f1: float) -> dict:
    return {"example_id": example_id, "sample": sample, "rewards": {"exact_match": em, "f1": f1},
            "tool_calls": [], "turns": [], "stop_reason": "answered"}


def _records() -> list[dict]:
    return [
        _record("nq/test_0", 0, 1.0, 1.0),
        _record("nq/test_0", 1, 0.0, 0.5),
        _record("nq/test_1", 0, 0.0, 0.0),
        _record("bamboogle/test_0", 0, 1.0, 1.0),
        _record("plain", 0, 0.0, 0.0),
    ]


def test_summary_scores_each_dataset_and_their_unweighted_average():
    s = summarize(_records(), EXAMPLES, wall_s=1.0)
    assert s["overall"]["em"] == pytest.approx(0.4)  # pooled over trajectories: 2 of 5
    assert list(s["by_dataset"]) == ["nq", "bamboogle", "unknown"]  # first appearance; unknown last
    assert s["by_dataset"]["nq"] == {"n": 3, "n_questions": 2, "em": pytest.approx(1 / 3), "f1": 0.5,
                                     "accuracy": pytest.approx(1 / 3)}
    assert s["by_dataset"]["bamboogle"] == {"n": 1, "n_questions": 1, "em": 1.0, "f1": 1.0, "accuracy": 1.0}
    assert s["by_dataset"]["unknown"] == {"n": 1, "n_questions": 1, "em": 0.0, "f1": 0.0, "accuracy": 0.0}
    # each dataset weighs the same, however many questions it has; "unknown" is no dataset
    assert s["dataset_average"] == {"n_datasets": 2, "em": pytest.approx(2 / 3), "f1": 0.75,
                                    "accuracy": pytest.approx(2 / 3)}
    json.dumps(s)

    md = markdown(s)
    assert "## By dataset" in md
    assert "| dataset | trajectories | questions | EM | F1 | accuracy |" in md
    assert "| nq | 3 | 2 | 33.3% | 50.0% | 33.3% |" in md
    assert "| bamboogle | 1 | 1 | 100.0% | 100.0% | 100.0% |" in md
    assert "| average of 2 datasets (unweighted) | – | – | 66.7% | 75.0% | 66.7% |" in md


def test_runs_without_dataset_names_have_no_dataset_table_and_compare_still_works():
    plain = {"plain": _example("plain", None)}
    old = summarize([_record("plain", 0, 1.0, 1.0)], plain, wall_s=1.0)
    assert "by_dataset" not in old and "dataset_average" not in old
    assert "By dataset" not in markdown(old)

    new = summarize(_records(), EXAMPLES, wall_s=1.0)
    table = compare({"before": old, "after": new})
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in table.splitlines()[2:]}
    assert rows["EM, nq"] == ["–", "33.3%", "– |"]
    assert rows["EM, bamboogle"] == ["–", "100.0%", "– |"]
    assert rows["EM, dataset average"] == ["–", "66.7%", "– |"]
    again = compare({"a": new, "b": new})
    assert "| EM, dataset average | 66.7% | 66.7% | +0.0 pts |" in again


def test_flashrag_examples_flow_into_the_dataset_table(flashrag_dir: Path):
    examples, _ = load_examples(str(flashrag_dir), split="test")
    records = [_record(e.id, 0, 1.0 if e.meta["dataset"] == "nq" else 0.0, 1.0) for e in examples]
    s = summarize(records, {e.id: e for e in examples}, wall_s=1.0)
    assert {k: g["em"] for k, g in s["by_dataset"].items()} == {"bamboogle": 0.0, "nq": 1.0}
    assert s["dataset_average"]["em"] == 0.5


# --- end to end: a text-only FlashRAG dir through `mmsearch eval` ----------------------------------------

def test_eval_runs_text_only_flashrag_questions_and_reports_per_dataset(flashrag_dir: Path, index_dir: Path,
                                                                       policy_dir: Path, hf_engine, tmp_path: Path):
    """Real tools and index, a scripted policy: a text search, a crop of an image the question does not
    have (an error the policy reads, not a crash), then the gold answer for NQ and a wrong one for Bamboogle."""
    from mmsearch.engines.scripted import ScriptedEngine
    from mmsearch.eval.run import EvalConfig, run_eval
    from mmsearch.protocols.qwen_tools import format_tool_call, format_turn

    def write_turn(traj) -> str:
        turns = [format_turn("search", format_tool_call("text_search", {"query": "capital", "k": 1})),
                 format_turn("crop", format_tool_call("crop", {"image": 0, "bbox": [0, 0, 4, 4]})),
                 format_turn("done", "<answer>Paris</answer>" if traj.example_id == "nq/test_1" else
                             "<answer>nobody</answer>")]
        return turns[min(len(traj.turns), len(turns) - 1)]

    cfg = EvalConfig(data=str(flashrag_dir), split="test", out=str(tmp_path / "out"), index=str(index_dir))
    cfg.engine.model, cfg.engine.device = str(policy_dir), "cpu"
    summary = run_eval(cfg, engine=ScriptedEngine(hf_engine.tokenizer, write_turn), progress=False)

    assert summary["overall"]["n_questions"] == 4 and summary["stop_reasons"] == {"answered": 4}
    assert summary["tools"]["crop"]["errors"] == 4  # image 0 does not exist in a text-only question
    assert summary["tools"]["text_search"]["errors"] == 0
    assert {k: g["em"] for k, g in summary["by_dataset"].items()} == {"bamboogle": 0.0, "nq": 0.5}
    assert summary["dataset_average"]["em"] == 0.25
    out = Path(cfg.out)
    assert json.loads((out / "summary.json").read_text())["by_dataset"]["nq"]["n_questions"] == 2
    assert "| average of 2 datasets (unweighted) | – | – | 25.0% |" in (out / "report.md").read_text()
    assert "By dataset" in (out / "report.html").read_text(encoding="utf-8")
    records = [json.loads(line) for line in (out / "trajectories.jsonl").read_text().splitlines()]
    assert all(r["image_files"] == [] for r in records)
