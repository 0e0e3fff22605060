"""The agent loop on the real tools: scripted policies for exact behaviour, the tiny policy for a smoke run.

Covers DESIGN.md invariant 5 (malformed actions and bad arguments become observations, never
crashes), the loop's limits, the message schema, and batching (one engine call per turn, one tool
batch per turn).
"""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from mmsearch.agent.config import AgentConfig, SamplingConfig
from mmsearch.agent.loop import AgentLoop
from mmsearch.engines.scripted import ScriptedEngine, replay
from mmsearch.example import Example
from mmsearch.protocols.qwen_tools import format_tool_call, format_turn
from mmsearch.trajectory import ToolCallRecord, TrajectoryBuilder, TurnRecord

STOP_REASONS = {"answered", "max_turns", "max_tokens", "invalid_actions"}
QUESTION = "Which nation is this?"


def _call(name, **arguments):
    return format_turn(f"I will use {name}.", format_tool_call(name, arguments))


def _answer(text="Ibrovova"):
    return format_turn("I know it now.", f"<answer>{text}</answer>")


SEARCH = _call("text_search", query="capital of the nation")
CROP = _call("crop", image=0, bbox=[10, 10, 120, 100])
ANSWER = _answer()

MALFORMED = {
    "no_action": (format_turn("Let me think.", "The answer is Ibrovova."), "no action"),
    "two_actions": (SEARCH + "\n" + format_tool_call("crop", {"image": 0, "bbox": [0, 0, 9, 9]}), "2 actions"),
    "bad_json": (format_turn("x", '<tool_call>{"name": "text_search", "arguments": {"query": }}</tool_call>'), "not valid JSON"),
    "unknown_tool": (_call("web_search", query="flag"), "unknown tool 'web_search'"),
    "text_after_action": (ANSWER + " Hope that helps!", "text after </answer>"),
}


@pytest.fixture(scope="module")
def scene(world_dir):
    record = json.loads((world_dir / "scenes.jsonl").read_text().splitlines()[0])
    return Image.open(world_dir / record["path"]).convert("RGB")


@pytest.fixture(scope="module")
def builder(hf_engine):
    return TrajectoryBuilder(hf_engine.processor)


def _example(scene, i=0, answer="Ibrovova"):
    return Example(f"ex{i}", QUESTION, [scene], [answer])


def _loop(hf_engine, toolbox, builder, write_turn, on_event=None, **limits):
    engine = ScriptedEngine(hf_engine.tokenizer, write_turn)
    return AgentLoop(engine, toolbox, builder, AgentConfig(**limits), on_event=on_event)


def _run_script(hf_engine, toolbox, builder, scene, turns, **limits):
    """Run one example through the loop with a fixed list of turns; return the trajectory."""
    loop = _loop(hf_engine, toolbox, builder, replay({"ex0": turns}), **limits)
    (traj,) = loop.run([_example(scene)])
    return traj


def _n_tokens(tokenizer, text):
    """Tokens the scripted engine generates for `text` (its end-of-turn token included)."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1


def _text(message):
    return "".join(p["text"] for p in message["content"] if p["type"] == "text")


def _assert_consistent(traj, builder, max_total=None):
    assert len(traj.token_ids) == len(traj.loss_mask) == len(traj.logprobs)
    assert sum(traj.loss_mask) == traj.n_generated
    if max_total is not None:
        assert len(traj.token_ids) <= max_total


def _assert_token_exact(traj, builder):
    """The sequence is the chat template's rendering of the messages (error observations included)."""
    text = builder.render(traj.messages, add_generation_prompt=False)
    expected = builder.processor(text=[text], images=traj.images or None, return_tensors="pt")["input_ids"][0].tolist()
    assert traj.token_ids == expected[: len(traj.token_ids)]


# -- malformed actions ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_action_becomes_error_observation(hf_engine, toolbox, builder, scene, case):
    bad, reason = MALFORMED[case]
    traj = _run_script(hf_engine, toolbox, builder, scene, [bad, ANSWER])
    assert [t.action for t in traj.turns] == ["invalid", "answer"]
    assert reason in traj.turns[0].error
    assistant, observation = traj.messages[2], traj.messages[3]
    assert assistant["role"] == "assistant" and assistant["content"] == bad and "tool_calls" not in assistant
    assert observation["role"] == "tool" and "tool_call_id" not in observation
    assert _text(observation).startswith("Error:") and reason in _text(observation)
    assert traj.tool_calls == []  # nothing ran
    assert traj.stop_reason == "answered" and traj.final_answer == "Ibrovova"
    _assert_consistent(traj, builder)
    _assert_token_exact(traj, builder)


def test_invalid_streak_ends_the_trajectory(hf_engine, toolbox, builder, scene):
    bad = MALFORMED["no_action"][0]
    traj = _run_script(hf_engine, toolbox, builder, scene, [bad, bad, bad, ANSWER], max_invalid_streak=3)
    assert traj.stop_reason == "invalid_actions" and traj.final_answer is None
    assert [t.action for t in traj.turns] == ["invalid"] * 3
    # The first two get an error observation; the third ends the trajectory instead.
    assert [m["role"] for m in traj.messages] == ["system", "user", "assistant", "tool", "assistant", "tool", "assistant"]
    _assert_consistent(traj, builder)


def test_valid_action_resets_the_invalid_streak(hf_engine, toolbox, builder, scene):
    bad, unknown = MALFORMED["bad_json"][0], MALFORMED["unknown_tool"][0]
    turns = [bad, unknown, SEARCH, bad, unknown, ANSWER]
    traj = _run_script(hf_engine, toolbox, builder, scene, turns, max_invalid_streak=3, max_turns=8)
    assert [t.action for t in traj.turns] == ["invalid", "invalid", "tool_call", "invalid", "invalid", "answer"]
    assert traj.stop_reason == "answered"
    assert [c.name for c in traj.tool_calls] == ["text_search"] and not traj.tool_calls[0].is_error


# -- bad tool arguments --------------------------------------------------------------------------

BAD_ARGUMENTS = {
    "crop_outside_image": (_call("crop", image=0, bbox=[0, 0, 5000, 40]), "exceeds image width"),
    "crop_reversed": (_call("crop", image=0, bbox=[50, 50, 10, 10]), "empty or reversed"),
    "crop_missing_bbox": (_call("crop", image=0), "'bbox' is a required property"),
    "image_search_missing_image": (_call("image_search", image=5), "image 5 does not exist"),
    "text_search_empty_query": (_call("text_search", query="   "), "query is empty"),
    "text_search_k_too_big": (_call("text_search", query="river", k=1000), "invalid arguments for text_search"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_bad_tool_arguments_are_error_results_not_invalid_actions(hf_engine, toolbox, builder, scene, case):
    call, reason = BAD_ARGUMENTS[case]
    # Three bad-argument calls in a row would end the trajectory if they counted as invalid actions.
    traj = _run_script(hf_engine, toolbox, builder, scene, [call, call, call, ANSWER], max_invalid_streak=2)
    assert [t.action for t in traj.turns] == ["tool_call"] * 3 + ["answer"]
    assert traj.stop_reason == "answered"
    assert len(traj.tool_calls) == 3
    for record in traj.tool_calls:
        assert record.is_error and record.result.startswith("Error:") and reason in record.result, record.result
        assert record.new_images == []
    observation = traj.messages[3]
    assert observation["role"] == "tool" and observation["tool_call_id"] == "call_0"
    assert reason in _text(observation)
    assert len(traj.images) == len(traj.pixel_values) == 1  # no image was added
    _assert_token_exact(traj, builder)


# -- limits --------------------------------------------------------------------------------------


def test_max_turns_stops_without_running_the_last_call(hf_engine, toolbox, builder, scene):
    traj = _run_script(hf_engine, toolbox, builder, scene, [SEARCH, CROP, ANSWER], max_turns=2)
    assert traj.stop_reason == "max_turns" and traj.final_answer is None
    assert [t.action for t in traj.turns] == ["tool_call", "tool_call"]
    assert [c.name for c in traj.tool_calls] == ["text_search"]  # the crop never ran
    assert traj.messages[-1]["role"] == "assistant"
    assert len(traj.images) == 1
    _assert_consistent(traj, builder)


def test_max_calls_per_tool(hf_engine, toolbox, builder, scene, monkeypatch):
    ran = []
    real = toolbox.tools["text_search"].run_batch
    monkeypatch.setattr(toolbox.tools["text_search"], "run_batch", lambda calls: ran.append(len(calls)) or real(calls))
    traj = _run_script(hf_engine, toolbox, builder, scene, [SEARCH, SEARCH, ANSWER],
                       max_calls_per_tool={"text_search": 1})
    assert ran == [1]  # the second call never reached the tool
    first, second = traj.tool_calls
    assert not first.is_error
    assert second.is_error and "text_search may be called at most 1 times" in second.result
    observation = traj.messages[5]
    assert observation["role"] == "tool" and observation["tool_call_id"] == "call_1"
    assert "at most 1 times" in _text(observation)
    assert traj.stop_reason == "answered" and traj.turns[1].action == "tool_call"


def test_max_images(hf_engine, toolbox, builder, scene):
    crop_again = _call("crop", image=0, bbox=[0, 0, 60, 60])
    traj = _run_script(hf_engine, toolbox, builder, scene, [CROP, crop_again, ANSWER], max_images=2)
    ok, refused = traj.tool_calls
    assert not ok.is_error and ok.new_images == [1]
    assert refused.is_error and "limit 2" in refused.result and refused.new_images == []
    assert len(traj.images) == len(traj.pixel_values) == len(traj.image_grid_thw) == 2
    assert [p for p in traj.messages[5]["content"] if p["type"] == "image"] == []
    assert traj.stop_reason == "answered"
    _assert_token_exact(traj, builder)


def test_max_tool_response_tokens(hf_engine, toolbox, builder, scene):
    long_search = _call("text_search", query="capital river founder", k=10)
    traj = _run_script(hf_engine, toolbox, builder, scene, [long_search, ANSWER], max_tool_response_tokens=20)
    record = traj.tool_calls[0]
    assert not record.is_error and "[truncated" not in record.result  # the log keeps the full result
    shown = _text(traj.messages[3])
    assert "[truncated" in shown
    kept, marker = shown.split(" … [truncated ")
    assert builder.count_tokens(kept) <= 21  # decoding 20 tokens may merge into a slightly different split
    assert int(marker.split()[0]) == builder.count_tokens(record.result) - 20
    assert traj.stop_reason == "answered"
    _assert_token_exact(traj, builder)


def test_max_new_tokens_per_trajectory(hf_engine, toolbox, builder, scene):
    tok = hf_engine.tokenizer
    limit = _n_tokens(tok, SEARCH) + 5
    traj = _run_script(hf_engine, toolbox, builder, scene, [SEARCH, SEARCH, ANSWER],
                       max_new_tokens_per_trajectory=limit)
    assert traj.stop_reason == "max_tokens"
    assert [t.n_tokens for t in traj.turns] == [limit - 5, 5]
    assert traj.turns[1].action == "invalid" and traj.turns[1].finish_reason == "length"
    assert traj.n_generated == limit and len(traj.tool_calls) == 1
    _assert_consistent(traj, builder)


@pytest.mark.parametrize("cut", ["in_generation", "in_tool_response"])
def test_max_total_tokens(hf_engine, toolbox, builder, scene, cut):
    tok = hf_engine.tokenizer
    prompt = len(builder.start("probe", 0, AgentLoop(ScriptedEngine(tok, lambda t: ""), toolbox, builder, AgentConfig()).system,
                               QUESTION, [scene]).token_ids)
    first = _n_tokens(tok, SEARCH)
    max_total = prompt + 7 if cut == "in_generation" else prompt + first + 10
    traj = _run_script(hf_engine, toolbox, builder, scene, [SEARCH, SEARCH, ANSWER], max_total_tokens=max_total)
    assert traj.stop_reason == "max_tokens"
    _assert_consistent(traj, builder, max_total)
    assert len(traj.token_ids) == max_total  # both cuts land in text, so nothing is dropped before the limit
    if cut == "in_generation":
        assert traj.turns[0].n_tokens == 7 and traj.turns[0].action == "invalid"
        assert traj.tool_calls == []
    else:
        assert len(traj.turns) == 1 and len(traj.tool_calls) == 1  # the search ran; its response was cut


def test_prompt_longer_than_max_total_tokens(hf_engine, toolbox, builder, scene):
    events = []
    loop = _loop(hf_engine, toolbox, builder, replay({"ex0": [ANSWER]}), lambda traj, kind, _: events.append(kind),
                 max_total_tokens=50)
    (traj,) = loop.run([_example(scene)])
    assert traj.stop_reason == "max_tokens" and traj.turns == []
    assert len(traj.token_ids) <= 50
    assert loop.timings.engine_calls == 0
    assert events == ["done"]


def test_turn_cut_by_the_per_turn_limit_is_invalid(hf_engine, toolbox, builder, scene):
    tok = hf_engine.tokenizer
    short_answer = "<answer>Ibrovova</answer>"
    limit = _n_tokens(tok, short_answer)
    assert _n_tokens(tok, SEARCH) > limit
    traj = _run_script(hf_engine, toolbox, builder, scene, [SEARCH, short_answer], max_new_tokens_per_turn=limit)
    cut = traj.turns[0]
    assert cut.action == "invalid" and cut.finish_reason == "length" and cut.n_tokens == limit
    assert "token limit before its action was complete" in cut.error
    assert "token limit" in _text(traj.messages[3]) and _text(traj.messages[3]).startswith("Error:")
    assert traj.tool_calls == []
    assert traj.stop_reason == "answered" and traj.final_answer == "Ibrovova"
    _assert_consistent(traj, builder)


# -- messages ------------------------------------------------------------------------------------


def test_answered_trajectory_follows_the_message_schema(hf_engine, toolbox, builder, scene):
    crop1 = _call("crop", image=1, bbox=[4, 4, 60, 60])
    search_image = _call("image_search", image=2, k=2)
    turns = [CROP, crop1, search_image, ANSWER]
    loop = _loop(hf_engine, toolbox, builder, replay({"ex0": turns}))
    (traj,) = loop.run([_example(scene)])
    assert traj.stop_reason == "answered" and traj.final_answer == "Ibrovova"
    m = traj.messages
    assert [x["role"] for x in m] == ["system", "user"] + ["assistant", "tool"] * 3 + ["assistant"]
    assert m[0] == {"role": "system", "content": loop.system}
    assert m[1]["content"] == [{"type": "image", "image": 0}, {"type": "text", "text": QUESTION}]
    expected_calls = [("crop", {"image": 0, "bbox": [10, 10, 120, 100]}), ("crop", {"image": 1, "bbox": [4, 4, 60, 60]}),
                      ("image_search", {"image": 2, "k": 2})]
    for i, (name, arguments) in enumerate(expected_calls):
        assistant, tool = m[2 + 2 * i], m[3 + 2 * i]
        assert assistant["content"] == turns[i]
        (call,) = assistant["tool_calls"]
        assert call["id"] == f"call_{i}" and call["type"] == "function" and call["function"]["name"] == name
        assert isinstance(call["function"]["arguments"], str) and json.loads(call["function"]["arguments"]) == arguments
        assert tool["tool_call_id"] == f"call_{i}" and tool["name"] == name
        assert tool["content"][0]["type"] == "text"
    # Crop results are numbered in order of appearance and say so.
    assert m[3]["content"][1:] == [{"type": "image", "image": 1}] and "[image 1]" in _text(m[3])
    assert m[5]["content"][1:] == [{"type": "image", "image": 2}] and "[image 2]" in _text(m[5])
    assert [p for p in m[7]["content"] if p["type"] == "image"] == []
    assert m[-1] == {"role": "assistant", "content": ANSWER}
    assert [c.new_images for c in traj.tool_calls] == [[1], [2], []]
    assert not any(c.is_error for c in traj.tool_calls)
    assert len(traj.images) == len(traj.pixel_values) == 3
    assert traj.images[2].width < traj.images[1].width < traj.images[0].width
    json.dumps(traj.to_record())  # the log view is JSON-able
    _assert_consistent(traj, builder)
    _assert_token_exact(traj, builder)


def test_events_arrive_in_order_per_trajectory(hf_engine, toolbox, builder, scene):
    events = {}
    loop = _loop(hf_engine, toolbox, builder,
                 replay({"ex0": [SEARCH, MALFORMED["no_action"][0], ANSWER], "ex1": [CROP, CROP, CROP]}),
                 lambda traj, kind, payload: events.setdefault(traj.example_id, []).append((kind, type(payload))),
                 max_turns=3)
    a, b = loop.run([_example(scene, 0), _example(scene, 1)])
    assert a.stop_reason == "answered" and b.stop_reason == "max_turns"
    turn, tool, done = (("turn", TurnRecord), ("tool", ToolCallRecord), ("done", type(None)))
    assert events["ex0"] == [turn, tool, turn, tool, turn, done]  # the invalid turn's error is a "tool" event too
    assert events["ex1"] == [turn, tool, turn, tool, turn, done]  # the last crop never runs


# -- batching ------------------------------------------------------------------------------------

BATCH_SCRIPTS = {
    0: [],
    1: [SEARCH],
    2: [CROP, _call("image_search", image=1, k=2)],
    3: [_call("text_search", query="river"), CROP, _call("text_search", query="founder")],
    4: [CROP, _call("crop", image=1, bbox=[0, 0, 40, 40]), SEARCH, _call("image_search", image=0)],
    5: [SEARCH, MALFORMED["bad_json"][0], CROP, _call("image_search", image=1), _call("text_search", query="flag")],
}


def test_batched_rollout_fuses_engine_and_tool_calls(hf_engine, toolbox, builder, scene, monkeypatch):
    batches, tool_batches = [], []
    real_call_batch = toolbox.call_batch
    monkeypatch.setattr(toolbox, "call_batch", lambda calls: batches.append([c.name for c in calls]) or real_call_batch(calls))

    def counting(name, real):
        def run_batch(calls):
            tool_batches.append((len(batches), name, len(calls)))
            return real(calls)
        return run_batch

    for name, tool in toolbox.tools.items():
        monkeypatch.setattr(tool, "run_batch", counting(name, tool.run_batch))

    def write_turn(traj):
        script = BATCH_SCRIPTS[int(traj.example_id[2:])]
        k = len(traj.turns)
        return script[k] if k < len(script) else _answer(f"answer {traj.example_id}")

    loop = _loop(hf_engine, toolbox, builder, write_turn, max_turns=8)
    examples = [_example(scene, i, f"answer ex{i}") for i in BATCH_SCRIPTS]
    trajectories = loop.run(examples, n_samples=2)

    assert [(t.example_id, t.sample) for t in trajectories] == [(f"ex{i}", s) for i in BATCH_SCRIPTS for s in range(2)]
    for traj in trajectories:
        script = BATCH_SCRIPTS[int(traj.example_id[2:])]
        assert traj.stop_reason == "answered" and traj.final_answer == f"answer {traj.example_id}"
        assert len(traj.turns) == len(script) + 1
        assert not any(c.is_error for c in traj.tool_calls), [c.result for c in traj.tool_calls]
        _assert_consistent(traj, builder)
    longest = max(len(s) for s in BATCH_SCRIPTS.values()) + 1
    assert loop.timings.engine_calls == longest

    # One toolbox batch per turn holding every valid call of that turn, both samples of each example.
    expected = []
    for turn in range(longest):
        names = []
        for script in BATCH_SCRIPTS.values():
            if turn < len(script) and script[turn] != MALFORMED["bad_json"][0]:
                names += [json.loads(script[turn].split("<tool_call>")[1].split("</tool_call>")[0])["name"]] * 2
        if names:
            expected.append(names)
    assert batches == expected
    # Inside a batch, each tool ran once with all of its calls.
    for n, names in enumerate(expected, start=1):
        ran = {name: size for b, name, size in tool_batches if b == n}
        assert ran == {name: names.count(name) for name in set(names)}
    assert len(tool_batches) == sum(len(set(names)) for names in expected)


# -- the real (untrained) policy -----------------------------------------------------------------


def test_smoke_with_the_tiny_policy(hf_engine, toolbox, builder, scene):
    cfg = AgentConfig(max_turns=3, max_new_tokens_per_turn=16, sampling=SamplingConfig(temperature=1.0, seed=0))
    loop = AgentLoop(hf_engine, toolbox, builder, cfg)
    examples = [Example(f"ex{i}", QUESTION + " " + "really " * i, [scene], ["Ibrovova"]) for i in range(3)]
    trajectories = loop.run(examples, n_samples=2)
    assert [(t.example_id, t.sample) for t in trajectories] == [(f"ex{i}", s) for i in range(3) for s in range(2)]
    # One engine call per turn serves every trajectory still active.
    assert loop.timings.engine_calls == max(len(t.turns) for t in trajectories)
    for traj in trajectories:
        assert traj.stop_reason in STOP_REASONS
        last = traj.turns[-1]
        if traj.stop_reason == "max_turns":
            assert len(traj.turns) == cfg.max_turns
        elif traj.stop_reason == "answered":
            assert last.action == "answer" and traj.final_answer
        elif traj.stop_reason == "invalid_actions":
            assert [t.action for t in traj.turns[-cfg.max_invalid_streak:]] == ["invalid"] * cfg.max_invalid_streak
        else:  # max_tokens: out of token budget
            assert traj.n_generated >= cfg.max_new_tokens_per_trajectory or len(traj.token_ids) >= cfg.max_total_tokens
        assert all(t.n_tokens <= cfg.max_new_tokens_per_turn for t in traj.turns)
        _assert_consistent(traj, builder, cfg.max_total_tokens)
        generated = [lp for lp, m in zip(traj.logprobs, traj.loss_mask) if m]
        assert generated and all(math.isfinite(lp) and lp <= 0 for lp in generated)
        assert all(lp == 0.0 for lp, m in zip(traj.logprobs, traj.loss_mask) if not m)
        assert len(traj.pixel_values) == len(traj.image_grid_thw) >= 1
