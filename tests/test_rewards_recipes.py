"""Rewards for the published recipes (Search-R1, R1-Searcher stages 1-2, R1-Searcher++, DeepMMSearch-R1-style judged
answers): the search and format rewards, the judge-or-exact-match answer reward, group rewards over the samples of one
question, and the dataset-field check that runs before any rollout."""

from __future__ import annotations

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from mmsearch.config import load_config
from mmsearch.example import Example
from mmsearch.rewards import (
    GROUP_REWARDS,
    REWARDS,
    JudgeConfig,
    RewardConfig,
    check_reward_fields,
    compute_rewards,
    compute_rewards_batch,
    get_reward,
    register_group_reward,
    register_reward,
    required_fields,
)
from mmsearch.rewards.registry import REQUIRES
from mmsearch.trajectory import ToolCallRecord, Trajectory, TurnRecord
from tools.server.app import BackgroundServer

GOLD = "Paris"


def make_traj(final_answer: str | None = None, turns=(), calls=(), example_id: str = "e", sample: int = 0) -> Trajectory:
    """`turns`: (action, has_think) pairs; `calls`: (tool name, is_error) pairs."""
    traj = Trajectory(example_id=example_id, sample=sample, messages=[], images=[])
    traj.turns = [TurnRecord(text="", action=action, has_think=think) for action, think in turns]
    traj.tool_calls = [
        ToolCallRecord(turn=i, name=name, arguments={}, result="", is_error=error) for i, (name, error) in enumerate(calls)
    ]
    traj.final_answer = final_answer
    return traj


def searcher(correct: bool, searches: int, example_id: str = "e", sample: int = 0) -> Trajectory:
    """A well-formed rollout that runs `searches` text searches, then answers right or wrong."""
    turns = [("tool_call", True)] * searches + [("answer", True)]
    calls = [("text_search", False)] * searches
    return make_traj(GOLD if correct else "Lyon", turns, calls, example_id=example_id, sample=sample)


def make_example(*answers: str, example_id: str = "e", requires_search: bool | None = None) -> Example:
    return Example(id=example_id, question="Which city is shown?", images=[], answers=list(answers),
                   requires_search=requires_search)


@pytest.fixture
def custom_rewards():
    """Names registered by a test, removed afterwards so tests stay independent."""
    before, before_group = set(REWARDS), set(GROUP_REWARDS)
    yield
    for name in set(REWARDS) - before:
        del REWARDS[name], REQUIRES[name]
    for name in set(GROUP_REWARDS) - before_group:
        del GROUP_REWARDS[name], REQUIRES[name]


# ---- per-trajectory rewards


@pytest.mark.parametrize("turns, final_answer, expected_ok", [
    ([], None, 0.0),  # nothing generated
    ([("answer", True)], "x", 1.0),
    ([("tool_call", True), ("tool_call", True), ("answer", True)], "x", 1.0),
    ([("tool_call", False), ("answer", True)], "x", 0.0),  # a turn without <think>
    ([("invalid", True), ("answer", True)], "x", 0.0),  # an invalid action, even if recovered from
    ([("tool_call", True), ("tool_call", True)], None, 0.0),  # ran out of turns without answering
    ([("invalid", True)], None, 0.0),  # gave up on invalid actions
])
def test_format_penalty(turns: list, final_answer: str | None, expected_ok: float) -> None:
    out = get_reward("format_penalty")(make_traj(final_answer, turns), make_example("x"))
    assert out == {"format_ok": expected_ok, "format_bad": 1.0 - expected_ok}


@pytest.mark.parametrize("calls, expected", [
    ([], {"retrieval_invoked": 0.0, "searched": 0.0, "search_calls": 0.0}),
    ([("crop", False)], {"retrieval_invoked": 0.0, "searched": 0.0, "search_calls": 0.0}),  # crop is not retrieval
    ([("text_search", True)], {"retrieval_invoked": 0.0, "searched": 1.0, "search_calls": 1.0}),  # made, failed
    ([("image_search", False)], {"retrieval_invoked": 1.0, "searched": 1.0, "search_calls": 1.0}),
    ([("text_search", True), ("text_search", False), ("crop", False), ("image_search", True)],
     {"retrieval_invoked": 1.0, "searched": 1.0, "search_calls": 3.0}),
    ([("", True)], {"retrieval_invoked": 0.0, "searched": 0.0, "search_calls": 0.0}),  # an unparsable action
])
def test_retrieval_and_search_use(calls: list, expected: dict) -> None:
    traj, example = make_traj("x", calls=calls), make_example("x")
    assert {**get_reward("retrieval")(traj, example), **get_reward("search_use")(traj, example)} == expected


@pytest.mark.parametrize("pred, golds, expected", [
    ("Paris", ["Paris"], 1.0),
    ("the paris!", ["Paris"], 1.0),  # normalized as exact_match is
    ("Bombay", ["Mumbai", "Bombay"], 1.0),  # an alias
    ("Paris, France", ["Paris"], 0.0),  # exact match offline, not substring
    (None, ["Paris"], 0.0),  # never answered
])
def test_answer_or_judge_offline_is_exact_match(pred: str | None, golds: list[str], expected: float) -> None:
    cfg = RewardConfig(functions=["answer_or_judge"], weights={"correct": 1.0})
    rewards = compute_rewards(make_traj(pred), make_example(*golds), cfg)
    assert rewards == {"correct": expected, "judge_error": 0.0, "reward": expected}


def _judge_app(hits: list[str]) -> FastAPI:
    """A stand-in judge: CORRECT exactly when the prediction mentions "capital of France"; model "broken" fails."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict:
        body = await request.json()
        prompt = body["messages"][-1]["content"]
        hits.append(prompt)
        if body["model"] == "broken":
            return JSONResponse({"error": "overloaded"}, status_code=503)
        verdict = "CORRECT" if "capital of France" in prompt.split("Predicted answer:")[1] else "INCORRECT"
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": verdict}}]}

    return app


@pytest.fixture(scope="module")
def judge_server():
    hits: list[str] = []
    with BackgroundServer(_judge_app(hits)) as server:
        yield server.url + "/v1", hits


@pytest.mark.parametrize("pred, model, expected_correct, expected_error, expected_hits", [
    ("the capital of France", "judge", 1.0, 0.0, 1),  # right, and only the judge can tell
    ("Lyon", "judge", 0.0, 0.0, 1),
    ("Paris", "judge", 1.0, 0.0, 0),  # an exact match needs no verdict
    (None, "judge", 0.0, 0.0, 0),  # no answer, no request
    ("the capital of France", "broken", 0.0, 1.0, 3),  # HTTP 503: first try and two retries, then scored 0
])
def test_answer_or_judge_with_endpoint(judge_server, pred, model, expected_correct, expected_error, expected_hits):
    url, hits = judge_server
    before = len(hits)
    cfg = RewardConfig(functions=["answer_or_judge"], weights={"correct": 1.0},
                       judge=JudgeConfig(api_base=url, model=model, backoff_s=0.0, timeout_s=5.0))
    [rewards] = compute_rewards_batch([make_traj(pred)], {"e": make_example(GOLD)}, cfg)
    assert (rewards["correct"], rewards["judge_error"]) == (expected_correct, expected_error)
    assert len(hits) - before == expected_hits


def test_answer_or_judge_with_endpoint_but_no_model_is_a_config_error() -> None:
    cfg = RewardConfig(functions=["answer_or_judge"], weights={}, judge=JudgeConfig(api_base="http://127.0.0.1:9/v1"))
    with pytest.raises(ValueError, match=r"judge\.model"):
        compute_rewards(make_traj(None), make_example("x"), cfg)
    with pytest.raises(ValueError, match=r"judge\.model"):
        check_reward_fields(cfg, [make_example("x")])


# ---- the group reward (R1-Searcher++)


@pytest.mark.parametrize("samples, cap, expected_bonus, expected_no_search", [
    # (correct, search calls) per sample; bonus = min(2 * var(calls of correct samples), cap) for the fewest
    ([(False, 0), (False, 2)], 2.0, [0, 0], [0, 0]),  # nobody right
    ([(True, 2), (False, 0)], 2.0, [0, 0], [0, 0]),  # one right: no spread, no bonus
    ([(True, 0), (True, 2), (False, 0)], 2.0, [2, 0, 0], [1, 0, 0]),  # var 1 -> 2; the wrong no-search gets nothing
    ([(True, 1), (True, 2)], 2.0, [0.5, 0], [0, 0]),  # var 0.25 -> 0.5
    ([(True, 1), (True, 1)], 2.0, [0, 0], [0, 0]),  # equal counts: nothing cheaper to reward
    ([(True, 0), (True, 0), (True, 3)], 2.0, [2, 2, 0], [1, 1, 0]),  # var 2 -> 4, capped at 2; ties share it
    ([(True, 0), (True, 0), (True, 3)], 10.0, [4, 4, 0], [1, 1, 0]),  # a higher cap
    ([(True, 0), (True, 1), (True, 1), (True, 1)], 2.0, [0.375, 0, 0, 0], [1, 0, 0, 0]),  # var 0.1875
])
def test_fewest_searches(samples: list, cap: float, expected_bonus: list, expected_no_search: list) -> None:
    trajs = [searcher(ok, n, sample=i) for i, (ok, n) in enumerate(samples)]
    cfg = RewardConfig(functions=["answer_or_judge", "fewest_searches"], fewest_searches_cap=cap,
                       weights={"correct": 1.0, "fewest_searches_bonus": 1.0})
    results = compute_rewards_batch(trajs, {"e": make_example(GOLD)}, cfg)
    assert [r["fewest_searches_bonus"] for r in results] == pytest.approx(expected_bonus)
    assert [r["answered_without_search"] for r in results] == expected_no_search
    assert [r["reward"] for r in results] == pytest.approx([float(ok) + b for (ok, _), b in zip(samples, expected_bonus)])


def test_group_rewards_group_by_example_id_not_position(custom_rewards) -> None:
    seen: dict[str, list[int]] = {}

    @register_group_reward("spy")
    def spy(trajectories, example, components, cfg):
        seen[example.id] = [t.sample for t in trajectories]
        assert all(t.example_id == example.id for t in trajectories)
        return [{} for _ in trajectories]

    # q1: right without searching (sample 0) and right after 2 searches (sample 2); q2: right after 1, wrong.
    trajs = [searcher(True, 0, "q1", 0), searcher(True, 1, "q2", 1), searcher(True, 2, "q1", 2),
             searcher(False, 0, "q2", 3)]
    examples = {"q1": make_example(GOLD, example_id="q1"), "q2": make_example(GOLD, example_id="q2")}
    cfg = RewardConfig(functions=["fewest_searches", "spy", "answer_or_judge", "search_use"],
                       weights={"correct": 1.0, "fewest_searches_bonus": 1.0})
    results = compute_rewards_batch(trajs, examples, cfg)
    assert seen == {"q1": [0, 2], "q2": [1, 3]}
    assert [r["fewest_searches_bonus"] for r in results] == [2.0, 0.0, 0.0, 0.0]  # q2 has one right sample
    assert [r["reward"] for r in results] == [3.0, 1.0, 1.0, 0.0]
    assert [r["search_calls"] for r in results] == [0.0, 1.0, 2.0, 0.0]
    assert [t.rewards for t in trajs] == results


def test_group_functions_run_after_per_trajectory_ones_and_in_listed_order(custom_rewards) -> None:
    @register_group_reward("first")
    def first(trajectories, example, components, cfg):
        assert all("correct" in c for c in components)
        return [{"rank": float(i)} for i in range(len(trajectories))]

    @register_group_reward("second")
    def second(trajectories, example, components, cfg):
        return [{"rank_seen": c["rank"]} for c in components]

    cfg = RewardConfig(functions=["first", "second", "answer_or_judge"], weights={"rank_seen": 1.0})
    results = compute_rewards_batch([searcher(True, 0, sample=0), searcher(True, 0, sample=1)],
                                    {"e": make_example(GOLD)}, cfg)
    assert [r["reward"] for r in results] == [0.0, 1.0]


def test_single_trajectory_scoring_refuses_group_rewards_but_a_batch_of_one_is_a_group() -> None:
    cfg = RewardConfig(functions=["answer_or_judge", "fewest_searches"], weights={"correct": 1.0})
    with pytest.raises(ValueError, match=r"\['fewest_searches'\].*compute_rewards_batch"):
        compute_rewards(searcher(True, 0), make_example(GOLD), cfg)
    [rewards] = compute_rewards_batch([searcher(True, 0)], {"e": make_example(GOLD)}, cfg)
    assert (rewards["fewest_searches_bonus"], rewards["answered_without_search"], rewards["reward"]) == (0.0, 1.0, 1.0)


def test_group_reward_without_its_correctness_component_says_what_to_add() -> None:
    cfg = RewardConfig(functions=["answer", "fewest_searches"], weights={})
    with pytest.raises(ValueError, match=r"'correct'.*answer_or_judge.*exact_match"):
        compute_rewards_batch([searcher(True, 0)], {"e": make_example(GOLD)}, cfg)
    cfg = RewardConfig(functions=["answer", "fewest_searches"], weights={}, correct_component="substring")
    results = compute_rewards_batch([searcher(True, 0), searcher(True, 1, sample=1)], {"e": make_example(GOLD)}, cfg)
    assert [r["fewest_searches_bonus"] for r in results] == [0.5, 0.0]


@pytest.mark.parametrize("outputs, error", [
    (lambda n: [{"x": 1.0}] * (n - 1), r"returned 1 results for 2 trajectories"),
    (lambda n: [{"x": 1.0}, {"y": 1.0}], r"different components"),
    (lambda n: [{"correct": 1.0}] * n, r"'correct' comes from both 'answer_or_judge' and 'bad'"),
    (lambda n: [{"reward": 1.0}] * n, r"'reward'"),
])
def test_group_reward_contract_violations(custom_rewards, outputs, error: str) -> None:
    register_group_reward("bad")(lambda trajectories, example, components, cfg: outputs(len(trajectories)))
    cfg = RewardConfig(functions=["answer_or_judge", "bad"], weights={})
    with pytest.raises(ValueError, match=error):
        compute_rewards_batch([searcher(True, 0), searcher(True, 1, sample=1)], {"e": make_example(GOLD)}, cfg)


def test_group_and_trajectory_rewards_share_one_namespace(custom_rewards) -> None:
    with pytest.raises(ValueError, match="a reward named 'answer' is already registered"):
        register_group_reward("answer")(lambda trajectories, example, components, cfg: [])
    with pytest.raises(ValueError, match="a group reward named 'fewest_searches' is already registered"):
        register_reward("fewest_searches")(lambda t, e: {})
    with pytest.raises(ValueError, match="listed twice"):
        compute_rewards(make_traj("x"), make_example("x"), RewardConfig(functions=["answer", "answer"]))


# ---- the recipes, as configs


RECIPES = {
    "search_r1": RewardConfig(functions=["answer"], weights={"exact_match": 1.0}),
    "judged_answer_and_format": RewardConfig(functions=["answer_or_judge", "format"],
                                             weights={"correct": 1.0, "format": 0.1}),
    "r1_searcher_stage1": RewardConfig(functions=["retrieval", "format_penalty"],
                                       weights={"retrieval_invoked": 0.5, "format_ok": 0.5}),
    "r1_searcher_stage2": RewardConfig(functions=["answer", "format_penalty"], weights={"f1": 1.0, "format_bad": -2.0}),
    "r1_searcher_plus": RewardConfig(functions=["answer_or_judge", "format_penalty", "search_use", "fewest_searches"],
                                     weights={"correct": 1.0, "format_bad": -2.0, "fewest_searches_bonus": 1.0}),
}


@pytest.mark.parametrize("recipe, traj, expected", [
    ("search_r1", searcher(True, 1), 1.0),
    ("search_r1", make_traj("Paris, France", [("answer", True)]), 0.0),
    ("judged_answer_and_format", make_traj(GOLD, [("tool_call", False), ("answer", True)]), 1.05),
    ("r1_searcher_stage1", searcher(False, 1), 1.0),  # retrieved and well-formed; the answer does not count
    ("r1_searcher_stage1", searcher(True, 0), 0.5),  # well-formed but never retrieved
    ("r1_searcher_stage1", make_traj(None, [("tool_call", True)], [("text_search", False)]), 0.5),  # no answer
    ("r1_searcher_stage2", make_traj("Paris, France", [("answer", True)]), 2 / 3),
    ("r1_searcher_stage2", make_traj(GOLD, [("invalid", True), ("answer", True)]), -1.0),
    ("r1_searcher_stage2", make_traj(None, [("tool_call", True)], [("text_search", False)]), -2.0),
    ("r1_searcher_plus", searcher(True, 3), 1.0),  # a group of one: no bonus
    ("r1_searcher_plus", make_traj(GOLD, [("answer", False)]), -1.0),
])
def test_recipes(recipe: str, traj: Trajectory, expected: float) -> None:
    [rewards] = compute_rewards_batch([traj], {"e": make_example(GOLD)}, RECIPES[recipe])
    assert rewards["reward"] == pytest.approx(expected)


def test_recipe_loads_from_yaml(tmp_path) -> None:
    path = tmp_path / "r1_searcher_plus.yaml"
    path.write_text(
        "functions: [answer, format_penalty, search_use, fewest_searches]\n"
        "weights: {substring: 1.0, format_bad: -2.0, fewest_searches_bonus: 1.0}\n"
        "correct_component: substring\n"
    )
    cfg = load_config(RewardConfig, path, overrides=["fewest_searches_cap=1.5"])
    assert (cfg.correct_component, cfg.fewest_searches_cap) == ("substring", 1.5)
    results = compute_rewards_batch([searcher(True, 0), searcher(True, 2, sample=1)], {"e": make_example(GOLD)}, cfg)
    assert [r["fewest_searches_bonus"] for r in results] == [1.5, 0.0]  # var 1 -> 2, capped at 1.5


# ---- what a reward needs from the dataset


@pytest.mark.parametrize("name, expected", [
    ("answer", ("answers",)),
    ("judge", ("answers",)),
    ("answer_or_judge", ("answers",)),
    ("format", ()),
    ("format_penalty", ()),
    ("tool_cost", ()),
    ("retrieval", ()),
    ("search_use", ()),
    ("fewest_searches", ()),  # reads correctness from a component; its producer declares what it needs
])
def test_required_fields(name: str, expected: tuple) -> None:
    assert required_fields(name) == expected


EXAMPLES = [make_example("Paris", example_id="a"), make_example(example_id="b"), make_example("  ", example_id="c"),
            make_example("Rome", example_id="d", requires_search=True)]


@pytest.mark.parametrize("functions, examples, error", [
    (["answer"], EXAMPLES[:1], None),
    (["answer"], EXAMPLES, r"reward 'answer' needs 'answers', which 2 of 4 examples lack \(e\.g\. b, c\)"),
    (["format", "format_penalty", "retrieval", "search_use", "tool_cost"], EXAMPLES, None),  # they read no field
    (["answer_or_judge", "format_penalty", "search_use", "fewest_searches"], EXAMPLES,
     r"^[^;]*'answer_or_judge' needs 'answers', which 2 of 4"),  # one problem, from the one reward that reads it
    (["answer", "answer_or_judge"], EXAMPLES, r"'answer' needs.*; reward 'answer_or_judge' needs"),  # all listed
    (["knows_when_to_search"], EXAMPLES, r"'knows_when_to_search' needs 'requires_search', which 3 of 4 .*a, b, c"),
    (["anwser"], EXAMPLES, r"unknown reward 'anwser'"),
])
def test_check_reward_fields(custom_rewards, functions: list, examples: list, error: str | None) -> None:
    register_reward("knows_when_to_search", requires=("requires_search",))(lambda t, e: {})
    cfg = RewardConfig(functions=functions, weights={})
    if error is None:
        check_reward_fields(cfg, examples)
    else:
        with pytest.raises(ValueError, match=error):
            check_reward_fields(cfg, examples)


def test_check_reward_fields_shortens_long_id_lists() -> None:
    examples = [make_example(example_id=f"q{i}") for i in range(5)]
    with pytest.raises(ValueError, match=r"5 of 5 examples lack \(e\.g\. q0, q1, q2, …\)"):
        check_reward_fields(RewardConfig(functions=["answer"]), examples)
