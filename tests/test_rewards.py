"""Rewards: answer normalization and matching, the built-in reward functions, weighting, and the LLM judge
against a real HTTP endpoint on loopback."""

from __future__ import annotations

import json
import re
import socket
import threading

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from mmsearch.config import load_config
from mmsearch.example import Example
from mmsearch.protocols.qwen_tools import parse_action
from mmsearch.rewards import (
    REWARDS,
    JudgeConfig,
    RewardConfig,
    compute_rewards,
    compute_rewards_batch,
    exact_match,
    get_reward,
    normalize_answer,
    parse_verdict,
    register_reward,
    score_answer,
    substring_match,
    token_f1,
)
from mmsearch.rewards.registry import REQUIRES
from mmsearch.trajectory import ToolCallRecord, Trajectory, TurnRecord
from tools.server.app import BackgroundServer


def make_traj(final_answer: str | None = None, turns=(), calls=(), example_id: str = "e") -> Trajectory:
    """`turns`: (action, has_think) pairs; `calls`: (name, is_error) pairs."""
    traj = Trajectory(example_id=example_id, sample=0, messages=[], images=[])
    traj.turns = [TurnRecord(text="", action=action, has_think=think) for action, think in turns]
    traj.tool_calls = [
        ToolCallRecord(turn=i, name=name, arguments={}, result="", is_error=error)
        for i, (name, error) in enumerate(calls)
    ]
    traj.final_answer = final_answer
    return traj


def make_example(*answers: str, question: str = "Which city is shown?", example_id: str = "e") -> Example:
    return Example(id=example_id, question=question, images=[], answers=list(answers))


# ---- normalization and matching


@pytest.mark.parametrize("raw, expected", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  an   apple,  a   day ", "apple day"),
    ("U.S.A.", "usa"),
    ("Jean-Paul Sartre", "jean paul sartre"),
    ("$5", "5"),
    ("Ｐａｒｉｓ", "paris"),  # full-width letters
    ("１，０００", "1000"),  # full-width digits and comma
    ("Zürich", "zurich"),
    ("São Paulo", "sao paulo"),
    ("STRASSE", "strasse"),
    ("Straße", "strasse"),
    ("Москва", "москва"),  # Cyrillic kept as is, only lowercased
    ("Йошкар-Ола", "йошкар ола"),  # й keeps its breve: only Latin letters lose marks
    ("北京市", "北 京 市"),  # Han characters are tokens of their own
    ("東京タワー", "東 京 タ ワ ー"),
    ("서울", "서울"),  # Hangul is spaced by word already
    ("1,000", "1000"),
    ("1,000,000.5", "1000000.5"),
    ("3.5", "3.5"),
    ("3,5", "3.5"),  # a decimal comma
    ("1.000", "1.000"),  # a period is never a thousands separator
    ("٣", "3"),  # Arabic-Indic digit
    ("It ended.", "it ended"),
    ("The", ""),
])
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize("pred, golds, expected", [
    ("Paris", ["paris"], 1.0),
    ("the Eiffel Tower.", ["Eiffel Tower"], 1.0),
    ("1,000", ["1000"], 1.0),
    ("1000", ["1,000"], 1.0),
    ("10000", ["1,000"], 0.0),
    ("3.5", ["3.5"], 1.0),
    ("35", ["3.5"], 0.0),  # SQuAD's stripping would call these equal
    ("Zurich", ["Zürich"], 1.0),
    ("ＵＳＡ", ["U.S.A."], 1.0),
    ("東京", ["東京"], 1.0),
    ("東京", ["京都"], 0.0),
    ("Bombay", ["Mumbai", "Bombay"], 1.0),  # any alias counts
    ("Paris, France", ["Paris"], 0.0),
    ("", ["Paris"], 0.0),
    ("Paris", [], 0.0),  # no gold: nothing can be right
])
def test_exact_match(pred: str, golds: list[str], expected: float) -> None:
    assert exact_match(pred, golds) == expected


@pytest.mark.parametrize("pred, golds, expected", [
    ("Eiffel Tower", ["the Eiffel Tower"], 1.0),
    ("the eiffel tower in paris", ["Eiffel Tower"], 2 / 3),  # P = 2/4, R = 2/2
    ("Barack Obama", ["Barack Hussein Obama II"], 2 / 3),  # P = 2/2, R = 2/4
    ("New York City", ["York"], 0.5),  # P = 1/3, R = 1
    ("paris paris", ["paris"], 2 / 3),  # a repeated token overlaps once: P = 1/2, R = 1
    ("Paris France", ["Lyon", "Paris", "France Paris"], 1.0),  # max over aliases; bag of words
    ("Paris France", ["Lyon", "Paris"], 2 / 3),
    ("London", ["Paris"], 0.0),
    ("北京市", ["北京"], 0.8),  # P = 2/3, R = 1
    ("1,000 people", ["1000"], 2 / 3),
    ("a", ["Paris"], 0.0),  # normalizes to nothing
])
def test_token_f1(pred: str, golds: list[str], expected: float) -> None:
    assert token_f1(pred, golds) == pytest.approx(expected)


@pytest.mark.parametrize("pred, golds, expected", [
    ("It is Paris, the capital.", ["Paris"], 1.0),
    ("Parisian cafés", ["Paris"], 0.0),  # whole tokens only
    ("the city of New York", ["New York"], 1.0),
    ("York New", ["New York"], 0.0),  # contiguous and in order
    ("about 1,000 people", ["1000"], 1.0),
    ("about 10,000 people", ["1000"], 0.0),
    ("in 北京市", ["北京"], 1.0),
    ("Mumbai (formerly Bombay)", ["Bombay", "Mumbai"], 1.0),
    ("Lyon", ["Paris", "Marseille"], 0.0),
    ("anything", ["The"], 0.0),  # a gold that normalizes to nothing is not inside everything
])
def test_substring_match(pred: str, golds: list[str], expected: float) -> None:
    assert substring_match(pred, golds) == expected


@pytest.mark.parametrize("pred, golds, expected", [
    (None, ["Paris"], {"exact_match": 0.0, "f1": 0.0, "substring": 0.0}),
    ("Paris", ["Paris"], {"exact_match": 1.0, "f1": 1.0, "substring": 1.0}),
    ("Paris, France", ["Paris"], {"exact_match": 0.0, "f1": pytest.approx(2 / 3), "substring": 1.0}),
])
def test_score_answer(pred: str | None, golds: list[str], expected: dict) -> None:
    assert score_answer(pred, golds) == expected


def test_several_answer_tags_are_invalid_and_score_zero() -> None:
    text = "<think>either</think><answer>Paris</answer><answer>Lyon</answer>"
    action = parse_action(text)
    assert action.kind == "invalid" and "2 actions" in action.error
    # The agent loop records such a turn as invalid and sets no final answer.
    traj = make_traj(final_answer=None, turns=[(action.kind, action.has_think)])
    rewards = compute_rewards(traj, make_example("Paris"), RewardConfig(functions=["answer", "format"]))
    assert rewards == {
        "exact_match": 0.0, "f1": 0.0, "substring": 0.0, "format": 0.0, "invalid_actions": 1.0, "reward": 0.0,
    }


# ---- built-in reward functions


@pytest.mark.parametrize("turns, expected_format, expected_invalid", [
    ([], 0.0, 0.0),
    ([("answer", True)], 1.0, 0.0),
    ([("tool_call", True), ("tool_call", True), ("answer", True)], 1.0, 0.0),
    ([("tool_call", False), ("answer", True)], 0.5, 0.0),  # valid but no <think>
    ([("invalid", True), ("tool_call", True), ("answer", True)], 2 / 3, 1.0),  # <think> but no valid action
    ([("invalid", False), ("invalid", True), ("answer", False), ("answer", True)], 0.25, 2.0),
])
def test_format_reward(turns: list, expected_format: float, expected_invalid: float) -> None:
    out = get_reward("format")(make_traj(turns=turns), make_example("x"))
    assert out == {"format": pytest.approx(expected_format), "invalid_actions": expected_invalid}


@pytest.mark.parametrize("calls, expected", [
    ([], {"tool_calls": 0.0, "tool_errors": 0.0, "tool_calls/text_search": 0.0, "tool_calls/image_search": 0.0,
          "tool_calls/crop": 0.0}),
    ([("text_search", False), ("crop", False), ("text_search", True), ("nonexistent", True)],
     {"tool_calls": 4.0, "tool_errors": 2.0, "tool_calls/text_search": 2.0, "tool_calls/image_search": 0.0,
      "tool_calls/crop": 1.0, "tool_calls/nonexistent": 1.0}),
])
def test_tool_cost_reward(calls: list, expected: dict) -> None:
    assert get_reward("tool_cost")(make_traj(calls=calls), make_example("x")) == expected


# ---- weighting


def test_weighted_sum_and_trajectory_rewards() -> None:
    traj = make_traj(
        final_answer="Paris, France",
        turns=[("tool_call", True), ("tool_call", False), ("answer", True)],
        calls=[("text_search", False), ("crop", False)],
    )
    weights = {"substring": 1.0, "f1": 0.5, "format": 0.3, "tool_calls": -0.05, "tool_calls/crop": -0.1}
    cfg = RewardConfig(weights=weights)
    rewards = compute_rewards(traj, make_example("Paris"), cfg)
    expected = 1.0 * 1.0 + 0.5 * (2 / 3) + 0.3 * (2 / 3) - 0.05 * 2 - 0.1 * 1
    assert rewards["reward"] == pytest.approx(expected)
    assert rewards["exact_match"] == 0.0 and rewards["invalid_actions"] == 0.0  # unweighted components are kept
    assert traj.rewards is rewards


def test_default_config_rewards_exact_match() -> None:
    assert compute_rewards(make_traj(final_answer="the Paris"), make_example("Paris"))["reward"] == 1.0
    assert compute_rewards(make_traj(final_answer=None), make_example("Paris"))["reward"] == 0.0


def test_weight_on_unknown_component_is_an_error() -> None:
    cfg = RewardConfig(functions=["answer"], weights={"exact_match": 1.0, "exactmatch": 0.5})
    with pytest.raises(ValueError, match=r"\['exactmatch'\].*exact_match.*substring"):
        compute_rewards(make_traj(final_answer="x"), make_example("x"), cfg)


def test_unknown_reward_function_lists_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown reward 'anwser'.*'answer'.*'format'.*'judge'.*'tool_cost'"):
        compute_rewards(make_traj(), make_example("x"), RewardConfig(functions=["anwser"]))


@pytest.fixture
def custom_rewards():
    """Names registered by a test, removed afterwards so tests stay independent."""
    before = set(REWARDS)
    yield
    for name in set(REWARDS) - before:
        del REWARDS[name], REQUIRES[name]


def test_user_registered_reward(custom_rewards) -> None:
    @register_reward("brevity")
    def brevity(trajectory: Trajectory, example: Example) -> dict[str, float]:
        return {"short_answer": float(len(trajectory.final_answer or "") <= 10)}

    cfg = RewardConfig(functions=["answer", "brevity"], weights={"exact_match": 1.0, "short_answer": 0.25})
    assert compute_rewards(make_traj(final_answer="Paris"), make_example("Paris"), cfg)["reward"] == 1.25
    long_wrong = make_traj(final_answer="a very long wrong answer")
    assert compute_rewards(long_wrong, make_example("Paris"), cfg)["reward"] == 0.0

    with pytest.raises(ValueError, match="already registered"):
        register_reward("brevity")(lambda t, e: {})


def test_component_clash_is_an_error(custom_rewards) -> None:
    register_reward("my_f1")(lambda t, e: {"f1": 1.0})
    with pytest.raises(ValueError, match=r"'f1' comes from both 'answer' and 'my_f1'"):
        compute_rewards(make_traj(final_answer="x"), make_example("x"), RewardConfig(functions=["answer", "my_f1"]))
    register_reward("sneaky")(lambda t, e: {"reward": 5.0})
    with pytest.raises(ValueError, match="'reward'"):
        compute_rewards(make_traj(), make_example("x"), RewardConfig(functions=["sneaky"], weights={}))


def test_reward_config_loads_through_omegaconf(tmp_path) -> None:
    path = tmp_path / "rewards.yaml"
    path.write_text("functions: [answer, tool_cost]\nweights: {exact_match: 1.0}\n")
    cfg = load_config(RewardConfig, path, overrides=["weights.tool_calls/crop=-0.1", "judge.model=judge-7b"])
    assert cfg.functions == ["answer", "tool_cost"]
    assert cfg.weights == {"exact_match": 1.0, "tool_calls/crop": -0.1}
    assert cfg.judge.model == "judge-7b" and cfg.judge.api_base == ""


# ---- the LLM judge


@pytest.mark.parametrize("reply, expected", [
    ("CORRECT", True),
    ("INCORRECT", False),
    ("correct.", True),
    ("  Incorrect\n", False),
    ("Verdict: **CORRECT**", True),
    ("It is not correct.", False),
    ("<think>At first glance this looks correct, but the year differs.</think>\nINCORRECT", False),
    ("The prediction seemed incorrect at first, but the alias matches. CORRECT", True),
    ("I cannot tell.", None),
    ("", None),
])
def test_parse_verdict(reply: str, expected: bool | None) -> None:
    assert parse_verdict(reply) is expected


def _judge_app(hits: list[dict]) -> FastAPI:
    """A stand-in judge model: CORRECT exactly when the predicted answer is in the prompt's gold list."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict:
        body = await request.json()
        hits.append({"model": body["model"], "auth": request.headers.get("authorization")})
        if body["model"] == "broken":
            return JSONResponse({"error": "overloaded"}, status_code=503)
        prompt = body["messages"][-1]["content"]
        golds = json.loads(re.search(r"^Gold answers: (.*)$", prompt, re.MULTILINE).group(1))
        pred = json.loads(re.search(r"^Predicted answer: (.*)$", prompt, re.MULTILINE).group(1))
        verdict = "CORRECT" if pred in golds else "INCORRECT"
        content = "I am unsure." if body["model"] == "vague" else f"<think>comparing</think>{verdict}"
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}

    return app


@pytest.fixture(scope="module")
def judge_server():
    hits: list[dict] = []
    with BackgroundServer(_judge_app(hits)) as server:
        yield server, hits


def _judge_cfg(api_base: str, model: str = "judge", **judge) -> RewardConfig:
    return RewardConfig(
        functions=["answer", "judge"], weights={"judge": 1.0},
        judge=JudgeConfig(api_base=api_base, model=model, backoff_s=0.0, timeout_s=5.0, **judge),
    )


@pytest.mark.parametrize("pred, golds, expected", [
    ("Abraham Lincoln", ["Abraham Lincoln", "Lincoln"], 1.0),
    ("Lincoln", ["Abraham Lincoln", "Lincoln"], 1.0),  # an alias
    ("Ulysses Grant", ["Abraham Lincoln", "Lincoln"], 0.0),
    ("Zürich \"quoted\"\nsecond line", ["Zürich \"quoted\"\nsecond line"], 1.0),  # survives the prompt's quoting
])
def test_judge_verdicts(judge_server, pred: str, golds: list[str], expected: float) -> None:
    server, _ = judge_server
    rewards = compute_rewards(make_traj(final_answer=pred), make_example(*golds), _judge_cfg(server.url + "/v1"))
    assert (rewards["judge"], rewards["judge_error"], rewards["reward"]) == (expected, 0.0, expected)


def test_judge_sends_the_api_key_from_the_environment(judge_server, monkeypatch) -> None:
    server, hits = judge_server
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test")
    cfg = _judge_cfg(server.url + "/v1", model="keyed", api_key_env="MY_JUDGE_KEY")
    compute_rewards(make_traj(final_answer="x"), make_example("x"), cfg)
    assert [h["auth"] for h in hits if h["model"] == "keyed"] == ["Bearer sk-test"]


def test_judge_skips_the_endpoint_without_an_answer(judge_server) -> None:
    server, hits = judge_server
    before = len(hits)
    rewards = compute_rewards(make_traj(final_answer=None), make_example("x"), _judge_cfg(server.url + "/v1"))
    assert (rewards["judge"], rewards["judge_error"]) == (0.0, 0.0)
    assert len(hits) == before


@pytest.mark.parametrize("model, expected_hits", [
    ("broken", 3),  # HTTP 503: the first attempt and two retries
    ("vague", 1),  # a reply with no verdict is not retried
])
def test_judge_failures_score_zero_with_an_error_flag(judge_server, caplog, model: str, expected_hits: int) -> None:
    server, hits = judge_server
    with caplog.at_level("WARNING", logger="mmsearch.rewards.judge"):
        cfg = _judge_cfg(server.url + "/v1", model=model)
        rewards = compute_rewards(make_traj(final_answer="x"), make_example("x"), cfg)
    assert (rewards["judge"], rewards["judge_error"]) == (0.0, 1.0)
    assert sum(h["model"] == model for h in hits) == expected_hits
    assert "judge failed on e/0" in caplog.text


def test_dead_judge_endpoint_does_not_raise(caplog) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with caplog.at_level("WARNING", logger="mmsearch.rewards.judge"):
        cfg = _judge_cfg(f"http://127.0.0.1:{port}/v1")
        rewards = compute_rewards(make_traj(final_answer="Paris"), make_example("Paris"), cfg)
    assert (rewards["judge"], rewards["judge_error"], rewards["exact_match"]) == (0.0, 1.0, 1.0)
    assert "ConnectError" in caplog.text and "3 attempt(s)" in caplog.text


@pytest.mark.parametrize("judge", [JudgeConfig(), JudgeConfig(api_base="http://127.0.0.1:9/v1")])
def test_judge_without_endpoint_or_model_is_a_config_error(judge: JudgeConfig) -> None:
    cfg = RewardConfig(functions=["judge"], weights={}, judge=judge)
    with pytest.raises(ValueError, match=r"judge\.(api_base|model)"):
        compute_rewards(make_traj(final_answer=None), make_example("x"), cfg)
    with pytest.raises(ValueError, match=r"judge\.(api_base|model)"):
        compute_rewards_batch([make_traj(final_answer="x")], {"e": make_example("x")}, cfg)


def test_batch_judges_concurrently_and_keeps_order(judge_server) -> None:
    server, hits = judge_server
    examples = {f"q{i}": make_example(f"answer {i}", example_id=f"q{i}") for i in range(12)}
    trajs = [make_traj(final_answer=f"answer {i}" if i % 3 else "wrong", example_id=f"q{i}") for i in range(12)]
    before = len(hits)
    threads_seen: set[str] = set()

    original = get_reward("judge")

    def spying(trajectory, example, cfg=None):
        threads_seen.add(threading.current_thread().name)
        return original(trajectory, example, cfg=cfg)

    REWARDS["judge"] = spying
    try:
        results = compute_rewards_batch(trajs, examples, _judge_cfg(server.url + "/v1", concurrency=4))
    finally:
        REWARDS["judge"] = original
    assert [r["judge"] for r in results] == [0.0 if i % 3 == 0 else 1.0 for i in range(12)]
    assert [t.rewards for t in trajs] == results
    assert len(hits) - before == 12
    assert all(name.startswith("judge") for name in threads_seen) and len(threads_seen) > 1
