"""`mmsearch.Agent`, the Python entry point: ask, ask_batch and stream on the tiny policy and the real tools.

A scripted engine gives exact tool use (a crop) where the untrained policy would not; the tiny
policy checks the real engine path (greedy batching equals single asks, streaming equals asking).
"""

from __future__ import annotations

import io
import itertools
import json
import subprocess
import sys
import threading

import pytest
from fake_openai import FakeChatEndpoint
from PIL import Image

import mmsearch
from mmsearch.agent.api import Agent, AgentEvent, AgentResult
from mmsearch.agent.setup import RolloutConfig, build_loop, vision_from_processor
from mmsearch.cli.ask_view import AskPrinter
from mmsearch.cli.main import main
from mmsearch.engines.scripted import ScriptedEngine, replay
from mmsearch.protocols.qwen_tools import format_tool_call, format_turn
from tools.imaging import seen_size, seen_to_original_box

QUESTION = "Which nation is this?"
STOP_REASONS = {"answered", "max_turns", "max_tokens", "invalid_actions"}
BBOX = [10, 10, 120, 100]
CROP = format_turn("Look closer.", format_tool_call("crop", {"image": 0, "bbox": BBOX}))
SEARCH = format_turn("Search.", format_tool_call("text_search", {"query": "capital of the nation"}))
ANSWER = format_turn("I know it now.", "<answer>Ibrovova</answer>")
LIMITS = {"max_turns": 2, "max_new_tokens_per_turn": 16, "temperature": 0.0}


@pytest.fixture(scope="module")
def scene_path(world_dir):
    record = json.loads((world_dir / "scenes.jsonl").read_text().splitlines()[0])
    return world_dir / record["path"]


@pytest.fixture(scope="module")
def agent(policy_dir, index_dir):
    """The tiny policy, greedy, over the small world's indexes."""
    return Agent.from_pretrained(policy_dir, index=index_dir, device="cpu", **LIMITS)


class Script:
    """A scripted policy whose turns each test sets (`script.write = replay(...)`)."""

    def __init__(self):
        self.write = replay({"ask": [ANSWER]})
        self.calls = 0

    def __call__(self, traj):
        self.calls += 1
        return self.write(traj)


@pytest.fixture(scope="module")
def scripted(policy_dir, index_dir, hf_engine):
    script = Script()
    cfg = RolloutConfig(index=str(index_dir))
    cfg.engine.model, cfg.engine.device = str(policy_dir), "cpu"
    cfg.agent.max_turns = 6
    return Agent(build_loop(cfg, engine=ScriptedEngine(hf_engine.tokenizer, script)), cfg), script


def _stream_threads():
    return [t for t in threading.enumerate() if t.name == "mmsearch-agent-stream"]


# -- ask -------------------------------------------------------------------------------------------


def test_ask_on_the_tiny_policy(agent, scene_path):
    result = agent.ask(scene_path, QUESTION)
    traj = result.trajectory
    assert isinstance(result, AgentResult)
    assert result.stop_reason in STOP_REASONS and result.stop_reason == traj.stop_reason
    assert result.answer == traj.final_answer
    assert (result.answer is not None) == (result.stop_reason == "answered")
    assert result.messages is traj.messages and result.turns is traj.turns and result.tool_calls is traj.tool_calls
    m = result.messages
    assert [x["role"] for x in m[:2]] == ["system", "user"]
    assert m[1]["content"] == [{"type": "image", "image": 0}, {"type": "text", "text": QUESTION}]
    assistant = [x["content"] for x in m if x["role"] == "assistant"]
    assert assistant == [t.text for t in result.turns] and 1 <= len(result.turns) <= LIMITS["max_turns"]
    with Image.open(scene_path) as original:
        assert result.images[0].size == original.size
    assert result.images is traj.images
    json.dumps(result.to_record())
    # The same question from bytes and from a PIL image (greedy): the same run.
    for image in (scene_path.read_bytes(), Image.open(scene_path)):
        again = agent.ask(image, QUESTION)
        assert again.trajectory.token_ids == traj.token_ids and again.answer == result.answer


def test_ask_batch_equals_single_asks_when_greedy(agent, scene_path):
    questions = [QUESTION, "What river flows through the city of this flag?", "Who founded it?"]
    engine_calls = agent.loop.timings.engine_calls
    batch = agent.ask_batch([(scene_path, q) for q in questions])
    assert agent.loop.timings.engine_calls - engine_calls == max(len(r.turns) for r in batch)  # one run, batched
    singles = [agent.ask(scene_path, q) for q in questions]
    for b, s in zip(batch, singles):
        assert b.trajectory.token_ids == s.trajectory.token_ids
        assert (b.answer, b.stop_reason) == (s.answer, s.stop_reason)
        assert [t.text for t in b.turns] == [t.text for t in s.turns]
    assert agent.ask_batch([]) == []


def test_stream_yields_the_run_in_order(agent, scene_path):
    events = list(agent.stream(str(scene_path), QUESTION))
    asked = agent.ask(scene_path, QUESTION)
    assert all(isinstance(e, AgentEvent) for e in events)
    assert events[0].kind == "start" and events[0].text == QUESTION and events[0].image_numbers == [0]
    assert events[-1].kind == "done"
    done = events[-1].result
    assert done.answer == asked.answer == events[-1].answer and done.stop_reason == asked.stop_reason
    assert done.trajectory.token_ids == asked.trajectory.token_ids
    # Every turn is a "turn" event, followed by a "tool" event when it got an observation.
    middle = events[1:-1]
    turns = [e for e in middle if e.kind == "turn"]
    assert [e.text for e in turns] == [t.text for t in done.turns]
    assert [e.turn for e in turns] == list(range(len(done.turns)))
    observations = [m for m in done.messages if m["role"] == "tool"]
    assert [e.kind for e in middle].count("tool") == len(observations)
    for before, event in itertools.pairwise(middle):
        if event.kind == "tool":
            assert before.kind == "turn" and before.turn == event.turn
    assert not _stream_threads()


# -- scripted tool use -----------------------------------------------------------------------------


def test_a_crop_comes_back_among_the_images(scripted, scene_path, hf_engine):
    agent, script = scripted
    script.write = replay({"ask": [CROP, ANSWER]})
    result = agent.ask(scene_path, QUESTION)
    assert result.answer == "Ibrovova" and result.stop_reason == "answered"
    assert len(result.images) == 2 and [c.new_images for c in result.tool_calls] == [[1]]
    vision = vision_from_processor(hf_engine.processor, agent.config.tools.vision)
    original = result.images[0].size
    x1, y1, x2, y2 = seen_to_original_box(tuple(BBOX), original, seen_size(*original, vision))
    assert result.images[1].size == (x2 - x1, y2 - y1)
    with Image.open(scene_path) as img:
        assert result.images[1].tobytes() == img.convert("RGB").crop((x1, y1, x2, y2)).tobytes()
    assert result.messages[3]["content"][1:] == [{"type": "image", "image": 1}]


def test_stream_carries_tool_images_and_the_cli_printer_saves_them(scripted, scene_path, tmp_path, capsys):
    agent, script = scripted
    script.write = replay({"ask": [SEARCH, CROP, ANSWER]})
    events = list(agent.stream(scene_path, QUESTION))
    assert [(e.kind, e.name) for e in events] == [
        ("start", ""), ("turn", "text_search"), ("tool", "text_search"), ("turn", "crop"), ("tool", "crop"),
        ("turn", ""), ("done", "")]
    search, crop = events[2], events[4]
    assert not search.is_error and search.text.startswith("[1] ") and search.images == []
    assert crop.image_numbers == [1] and crop.images[0] is events[-1].result.images[1]
    assert events[3].arguments == {"image": 0, "bbox": BBOX} and events[5].answer == "Ibrovova"

    printer = AskPrinter(tmp_path / "out")
    printer.start(QUESTION, str(scene_path))
    for event in events:
        printer.show(event)
    out = capsys.readouterr().out
    assert "call:  crop(" in out and f"[image 1] saved to {tmp_path / 'out' / 'image_1.png'}" in out
    assert "final answer: Ibrovova   [answered; 3 turns, 2 tool calls" in out
    assert Image.open(tmp_path / "out" / "image_1.png").size == crop.images[0].size


def test_stopping_a_stream_early_ends_its_run(scripted, scene_path):
    agent, script = scripted
    script.write, script.calls = replay({"ask": [SEARCH]}), 0  # would search until max_turns
    stream = agent.stream(scene_path, QUESTION)
    assert next(stream).kind == "start" and next(stream).kind == "turn"
    stream.close()
    assert not _stream_threads() and script.calls < agent.loop.cfg.max_turns
    script.write = replay({"ask": [ANSWER]})
    assert agent.ask(scene_path, QUESTION).answer == "Ibrovova"  # the agent is free again


def test_an_error_in_the_loop_reaches_the_stream_consumer(scripted, scene_path):
    agent, script = scripted

    def broken(traj):
        raise RuntimeError("engine fell over")

    script.write = broken
    with pytest.raises(RuntimeError, match="engine fell over"):
        list(agent.stream(scene_path, QUESTION))
    assert not _stream_threads()
    script.write = replay({"ask": [ANSWER]})
    assert agent.ask(scene_path, QUESTION).answer == "Ibrovova"


# -- bad input -------------------------------------------------------------------------------------


def test_unreadable_images_are_clear_value_errors(scripted, tmp_path, scene_path):
    agent, _ = scripted
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match=f"cannot read image {bad}"):
        agent.ask(bad, QUESTION)
    with pytest.raises(ValueError, match=r"cannot read image \(12 bytes\)"):
        agent.ask(b"not an image", QUESTION)
    with pytest.raises(ValueError, match="cannot read image .*missing.png"):
        agent.ask(tmp_path / "missing.png", QUESTION)
    truncated = io.BytesIO()
    Image.open(scene_path).save(truncated, format="PNG")
    with pytest.raises(ValueError, match="cannot read image"):
        agent.ask(truncated.getvalue()[:2000], QUESTION)
    with pytest.raises(ValueError, match="cannot read image of item 1"):
        agent.ask_batch([(scene_path, QUESTION), (bad, QUESTION)])
    with pytest.raises(ValueError, match="cannot read image"):
        agent.stream(bad, QUESTION)  # at the call, before any event
    with pytest.raises(TypeError, match="file path, bytes or a PIL image"):
        agent.ask(42, QUESTION)


# -- construction ----------------------------------------------------------------------------------


def test_a_url_model_is_the_openai_engine(scene_path):
    replies = iter([CROP, ANSWER])
    with FakeChatEndpoint(lambda body: next(replies)) as fake:
        config = RolloutConfig()
        agent = Agent.from_pretrained(fake.api_base, tools=["crop"], config=config, max_images=4, seed=7)
        assert (agent.config.engine.kind, agent.config.engine.api_base, agent.config.engine.model) == (
            "openai", fake.api_base, "default")
        assert agent.config.agent.max_images == 4 and agent.config.agent.sampling.seed == 7
        assert config.engine.kind == "hf" and config.agent.max_images == 8  # the caller's config is untouched
        result = agent.ask(scene_path, QUESTION)
    assert result.answer == "Ibrovova" and len(result.images) == 2 and not result.trajectory.token_exact
    with pytest.raises(TypeError, match="unknown agent setting 'max_turnz'"):
        Agent.from_pretrained("http://127.0.0.1:1/v1", tools=["crop"], max_turnz=3)


def test_import_mmsearch_stays_light():
    code = "import sys, mmsearch; print(sorted({'torch', 'transformers', 'PIL'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert mmsearch.Agent is Agent and "Agent" in dir(mmsearch)
    with pytest.raises(AttributeError):
        mmsearch.Agnet  # noqa: B018


# -- the CLI ---------------------------------------------------------------------------------------


def test_cli_ask_prints_the_run_and_its_json(policy_dir, index_dir, scene_path, tmp_path, capsys):
    argv = ["ask", QUESTION, "--image", str(scene_path), "--model", str(policy_dir), "--index", str(index_dir),
            "--out", str(tmp_path), "engine.device=cpu", "agent.max_turns=2", "agent.max_new_tokens_per_turn=16",
            "agent.sampling.temperature=0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("─" * 72 + f"\nquestion: {QUESTION}\n[image 0] {scene_path}\n")
    assert "\nfinal answer: " in out
    assert main([*argv, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["example_id"] == "ask" and record["stop_reason"] in STOP_REASONS and "image_files" in record
    assert record["messages"][1]["content"][1] == {"type": "text", "text": QUESTION}


def test_cli_ask_with_a_corrupt_image_exits_2(tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    assert main(["ask", QUESTION, "--image", str(bad), "--model", str(tmp_path / "no-policy")]) == 2
    assert f"mmsearch: error: cannot read image {bad}" in capsys.readouterr().err
