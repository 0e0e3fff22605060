"""Every protocol (mmsearch/protocols): its actions round-trip, bad text never crashes, and rollouts in it
keep DESIGN.md's invariants on the tiny policy with the real tools (token-exact ids, the loss mask,
image placeholders); SFT renders the same gold rows in it; the hf engine stops at its stop strings."""

from __future__ import annotations

import json

import pytest
import torch
from trajectory_checks import assert_token_exact

from mmsearch.agent.config import AgentConfig
from mmsearch.agent.loop import AgentLoop
from mmsearch.agent.setup import protocol_for, vision_from_processor
from mmsearch.engines.base import GenerationRequest, SamplingParams
from mmsearch.engines.hf import HFEngine
from mmsearch.engines.scripted import ScriptedEngine, replay
from mmsearch.eval.loaders import load_examples
from mmsearch.example import Example
from mmsearch.protocols import PROTOCOLS, Action, ProtocolError, convert_messages, get_protocol
from mmsearch.sft.samples import SampleLimits, build_sample, crop_toolbox, load_samples
from mmsearch.trajectory import TrajectoryBuilder
from tools.config import ToolsConfig, VisionResizeConfig
from tools.registry import build_toolbox

NAMES = sorted(PROTOCOLS)
ANSWER = Action("answer", thinking="It is in the results.", answer="Ibrovova")
# Tool calls each protocol can write, in an order that makes a sensible trajectory.
CALLS = {
    "qwen_tools": [Action("tool_call", thinking="Crop it.", name="crop", arguments={"image": 0, "bbox": [0, 0, 100, 80]}),
                   Action("tool_call", thinking="Search the crop.", name="image_search", arguments={"image": 1, "k": 2}),
                   Action("tool_call", thinking="Look it up.", name="text_search", arguments={"query": "capital of Ibrovova"})],
    "search_r1": [Action("tool_call", thinking="I need the capital.", name="text_search", arguments={"query": "capital of Ibrovova"}),
                  Action("tool_call", thinking="And the river.", name="text_search", arguments={"query": "river"})],
    "r1_searcher": [Action("tool_call", thinking="I need the capital.", name="text_search", arguments={"query": "capital Ibrovova"}),
                    Action("tool_call", thinking="And the river.", name="text_search", arguments={"query": "river"})],
    "mmsearch_r1": [Action("tool_call", thinking="I do not know this picture.", name="image_search", arguments={"image": 0}),
                    Action("tool_call", thinking="Now its capital.", name="text_search", arguments={"query": "capital of Ibrovova"})],
}
GARBAGE = ["", "   ", "just some words", "<answer>", "</answer>", "<answer>  </answer>", "<search>unclosed",
           "<tool_call>{not json}</tool_call>", "<|begin_of_query|>", "<|end_of_query|>", "<text_search>q",
           "<search><img>", "Zürich 東京 🚩 <<>>", "<think><think></think>", "\x00\x01"]


def _same(a: Action, b: Action) -> bool:
    return (a.kind, a.name, a.arguments, a.answer, a.thinking) == (b.kind, b.name, b.arguments, b.answer, b.thinking)


@pytest.mark.parametrize("name", NAMES)
def test_every_action_round_trips(name):
    protocol = get_protocol(name)
    for action in [*CALLS[name], ANSWER]:
        parsed = protocol.parse(protocol.format_action(action))
        assert _same(parsed, action), (protocol.format_action(action), parsed)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("text", GARBAGE)
def test_bad_text_is_an_invalid_action_with_a_reason(name, text):
    action = get_protocol(name).parse(text)
    assert action.kind == "invalid" and action.error, (name, text, action)


def test_paper_parsing_rules():
    search_r1, r1, mm = (get_protocol(n) for n in ("search_r1", "r1_searcher", "mmsearch_r1"))
    # Search-R1 takes the first <search> or <answer> of the turn.
    first = search_r1.parse("<think>a</think><search> first </search> <answer> later </answer>")
    assert (first.kind, first.arguments) == ("tool_call", {"query": "first"})
    # R1-Searcher cleans the query as its training does; the last answer wins.
    query = r1.parse(' plan <|begin_of_query|> "capital"   of\tX <|end_of_query|>')
    assert (query.kind, query.arguments, query.thinking) == ("tool_call", {"query": "capital of X"}, "plan")
    assert r1.parse("x </think>\n\n<answer> a </answer> <answer> b </answer>").answer == "b"
    # MMSearch-R1's search tags count only at the end of the turn; the image is always the question's.
    image = mm.parse("<reason>unknown</reason>\n<search><img></search>\n")
    assert (image.name, image.arguments, image.thinking) == ("image_search", {"image": 0}, "unknown")
    assert mm.parse("<reason>r</reason><search><img></search> and more").kind == "invalid"
    with pytest.raises(ProtocolError, match="whole image"):
        mm.format_action(Action("tool_call", name="image_search", arguments={"image": 2}))


# -- rollouts in every protocol ----------------------------------------------------------------

def _toolbox(name, search, processor):
    tools = ["text_search", "image_search", "crop"] if name == "qwen_tools" else list(PROTOCOLS[name].tools)
    cfg = ToolsConfig(enabled=tools)
    cfg.vision = vision_from_processor(processor, cfg.vision)
    protocol_for(AgentConfig(protocol=name), cfg)
    return build_toolbox(cfg, search)


@pytest.fixture(scope="module")
def rollouts(world_dir, hf_engine, search, scene):
    out = {}
    for name in NAMES:
        protocol = get_protocol(name)
        builder = TrajectoryBuilder(hf_engine.processor, protocol=protocol)
        turns = {"ex": [protocol.format_action(a) for a in [*CALLS[name], ANSWER]]}
        engine = ScriptedEngine(hf_engine.tokenizer, replay(turns))
        loop = AgentLoop(engine, _toolbox(name, search, hf_engine.processor), builder, AgentConfig(protocol=name, max_turns=8))
        traj = loop.run([Example("ex", "Which nation is this", [scene], ["Ibrovova"])])[0]
        out[name] = (protocol, builder, turns["ex"], traj)
    return out


@pytest.fixture(scope="module")
def scene(world_dir):
    from PIL import Image

    record = json.loads((world_dir / "scenes.jsonl").read_text().splitlines()[0])
    return Image.open(world_dir / record["path"]).convert("RGB")


@pytest.mark.parametrize("name", NAMES)
def test_rollout_is_token_exact_in_every_protocol(rollouts, name):
    protocol, builder, turns, traj = rollouts[name]
    assert traj.stop_reason == "answered" and traj.final_answer == "Ibrovova"
    assert len(traj.tool_calls) == len(CALLS[name]) and not any(c.is_error for c in traj.tool_calls), traj.tool_calls
    assert_token_exact(protocol, builder, turns, traj)


def test_results_are_written_as_each_paper_writes_them(rollouts):
    _, _, _, search_r1 = rollouts["search_r1"]
    result = search_r1.tool_calls[0].result
    assert result.startswith('Doc 1(Title: "') and '\nDoc 2(Title: "' in result, result
    assert "<information>Doc 1(Title:" in search_r1.rendered and "</information>\n\n<think>" in search_r1.rendered
    _, _, _, r1 = rollouts["r1_searcher"]
    assert "<|end_of_query|>\n\n<|begin_of_documents|>\n(1)Title: " in r1.rendered
    assert r1.rendered.count("<|end_of_documents|>\n\n") == 2
    _, _builder, _, mm = rollouts["mmsearch_r1"]
    assert "Here is the image and the question:\n<|vision_start|>" in mm.rendered
    assert "<|vision_end|> Which nation is this<|im_end|>" in mm.rendered
    assert "<|im_start|>user\nSearched results: <information>[Image Search Results]" in mm.rendered
    assert "</information>\nOriginal user's question: Which nation is this\nPlease extract the visual element" in mm.rendered
    assert "\nOriginal user's question: Which nation is this\nPlease analyze the search results" in mm.rendered


@pytest.mark.parametrize("name", NAMES)
def test_an_invalid_action_is_read_back_and_the_loop_goes_on(hf_engine, search, scene, name):
    protocol = get_protocol(name)
    builder = TrajectoryBuilder(hf_engine.processor, protocol=protocol)
    turns = {"ex": ["I am not sure what to do.", protocol.format_action(ANSWER)]}
    loop = AgentLoop(ScriptedEngine(hf_engine.tokenizer, replay(turns)), _toolbox(name, search, hf_engine.processor),
                     builder, AgentConfig(protocol=name))
    traj = loop.run([Example("ex", "Which nation is this?", [scene], ["Ibrovova"])])[0]
    assert [t.action for t in traj.turns] == ["invalid", "answer"] and traj.final_answer == "Ibrovova"
    feedback = next(m for m in traj.messages if m["role"] == "tool")
    assert feedback["content"][0]["text"] == protocol.invalid_feedback(traj.turns[0].error)
    assert protocol.invalid_feedback(traj.turns[0].error) in builder.tokenizer.decode(traj.token_ids)


def test_tools_and_engines_a_protocol_cannot_use_are_refused(hf_engine, search, toolbox):
    builder = TrajectoryBuilder(hf_engine.processor, protocol=get_protocol("search_r1"))
    with pytest.raises(ProtocolError, match="no action for image_search, crop.*tools.enabled=\\[text_search\\]"):
        AgentLoop(hf_engine, toolbox, builder, AgentConfig(protocol="search_r1"))
    text_only = _toolbox("search_r1", search, hf_engine.processor)
    with pytest.raises(ProtocolError, match="chat-level engine"):
        AgentLoop(ScriptedEngine(None, replay({})), text_only, None, AgentConfig(protocol="search_r1"))
    with pytest.raises(ProtocolError, match="renders 'qwen_tools'"):
        AgentLoop(hf_engine, text_only, TrajectoryBuilder(hf_engine.processor), AgentConfig(protocol="search_r1"))
    with pytest.raises(ProtocolError, match="unknown protocol 'nope'; choose one of qwen_tools"):
        get_protocol("nope")


# -- the engine stops at stop strings ----------------------------------------------------------

def test_hf_engine_stops_where_a_stop_string_completes(hf_engine, scene):
    builder = TrajectoryBuilder(hf_engine.processor)
    trajectories = [builder.start("e", i, "You are a test.", "Which nation?" + " really" * i, [scene]) for i in range(3)]
    requests = [GenerationRequest(t.token_ids, t.images, t.pixel_tensor(), t.grid_tensor(), 16, None) for t in trajectories]
    free = hf_engine.generate(requests, SamplingParams(temperature=0.0, max_new_tokens=16), [])
    tok = hf_engine.tokenizer
    # A stop string that row 0 completes at its 6th token, spanning two tokens.
    stop = tok.decode(free[0].token_ids[4:6])
    assert len(stop) > 1
    params = SamplingParams(temperature=0.0, max_new_tokens=16, stop_strings=[stop])
    reference = HFEngine(hf_engine.model, hf_engine.processor, cache_turns=False)
    for outputs in (hf_engine.generate(requests, params, []), reference.generate(requests, params, [])):
        assert outputs[0].token_ids == free[0].token_ids[: len(outputs[0].token_ids)]
        assert len(outputs[0].token_ids) <= 6 and outputs[0].finish_reason == "stop"
        for out, full in zip(outputs, free):
            assert out.token_ids == full.token_ids[: len(out.token_ids)]
            text = tok.decode(out.token_ids)
            if out.finish_reason == "stop":
                assert stop in text and stop not in tok.decode(out.token_ids[:-1])
            else:
                assert stop not in text and out.token_ids == full.token_ids
    hf_engine.reset()


# -- SFT renders the same gold rows in every protocol ------------------------------------------

@pytest.mark.parametrize("name", ["search_r1", "mmsearch_r1", "r1_searcher"])
def test_sft_sample_of_a_converted_gold_trajectory_equals_a_rollout(hf_engine, search, scene, name):
    """A gold trajectory as the dataset stores it (qwen_tools, tool text in the default layout), rendered
    in another protocol by SFT, equals a rollout of the converted turns through that protocol's loop."""
    processor, tok = hf_engine.processor, hf_engine.tokenizer
    protocol = get_protocol(name)
    vision = vision_from_processor(processor, VisionResizeConfig())
    toolbox = build_toolbox(ToolsConfig(enabled=list(protocol.tools), vision=vision), search)
    example = Example("ex", "Which nation is this?", [scene], ["Ibrovova"])
    qwen = get_protocol("qwen_tools")
    gold_turns = {"ex": [qwen.format_action(a) for a in [*CALLS[name], ANSWER]]}
    gold = AgentLoop(ScriptedEngine(tok, replay(gold_turns)), toolbox, TrajectoryBuilder(processor), AgentConfig()).run([example])[0]
    assert gold.stop_reason == "answered" and len(gold.tool_calls) == len(CALLS[name])

    builder = TrajectoryBuilder(processor, protocol=protocol)
    sample = build_sample(builder, example, gold.messages, crop_toolbox(vision), SampleLimits())
    converted = convert_messages(gold.messages, protocol, [], example.question)
    turns = {"ex": [m["content"] for m in converted if m["role"] == "assistant"]}
    rollout = AgentLoop(ScriptedEngine(tok, replay(turns)), toolbox, builder, AgentConfig(protocol=name)).run([example])[0]
    assert rollout.stop_reason == "answered" and rollout.final_answer == "Ibrovova"
    assert sample.token_ids == rollout.token_ids
    assert sample.loss_mask == rollout.loss_mask
    assert all(torch.equal(a, b) for a, b in zip(sample.pixel_values, rollout.pixel_values, strict=True))


@pytest.mark.parametrize("name", ["search_r1", "mmsearch_r1"])
def test_gold_rows_a_protocol_cannot_express_are_skipped_with_a_count(gold_dataset, hf_engine, name):
    protocol = get_protocol(name)
    builder = TrajectoryBuilder(hf_engine.processor, protocol=protocol)
    vision = vision_from_processor(hf_engine.processor, VisionResizeConfig())
    examples, _ = load_examples(str(gold_dataset), split="train", limit=40)
    samples, report = load_samples(str(gold_dataset), "train", builder, vision, SampleLimits(), limit=40)
    # A gold row fits the protocol when every call it makes names a tool the protocol has (mmsearch_r1's
    # image search takes the question's whole image only); read off the stored calls, not the converter.
    def fits(ex) -> bool:
        calls = [json.loads(c["function"]["arguments"]) | {"name": c["function"]["name"]}
                 for m in json.loads(ex.meta["messages"]) for c in m.get("tool_calls") or []]
        return all(c["name"] in protocol.tools and (name != "mmsearch_r1" or c.get("image", 0) == 0) for c in calls)

    convertible = [ex.id for ex in examples if fits(ex)]
    assert 0 < len(convertible) < len(examples)
    assert report.skipped.get(f"not_in_{name}", 0) == len(examples) - len(convertible)
    assert [s.example_id for s in samples] == convertible


def test_mmsearch_eval_runs_the_vl_policy_in_mmsearch_r1(policy_dir, index_dir, gold_dataset, tmp_path):
    """`mmsearch eval --protocol mmsearch_r1`: the protocol's tools only, its prompt, records that say it."""
    from omegaconf import OmegaConf

    from mmsearch.cli.main import main
    from mmsearch.protocols.mmsearch_r1 import FIRST_PROMPT

    out = tmp_path / "eval"
    assert main(["eval", "--protocol", "mmsearch_r1", "--model", str(policy_dir), "--index", str(index_dir),
                 "--data", str(gold_dataset), "--split", "test", "--limit", "3", "--out", str(out),
                 "agent.max_turns=2", "agent.max_new_tokens_per_turn=16", "agent.sampling.temperature=0"]) == 0
    cfg = OmegaConf.load(out / "eval_config.yaml")
    assert cfg.agent.protocol == "mmsearch_r1" and list(cfg.tools.enabled) == ["image_search", "text_search"]
    records = [json.loads(line) for line in (out / "trajectories.jsonl").read_text().splitlines()]
    assert len(records) == 3 and {r["protocol"] for r in records} == {"mmsearch_r1"}
    for record in records:
        assert record["messages"][0]["role"] == "user"  # no system prompt: the template adds its default
        assert record["messages"][0]["content"][0]["text"] == FIRST_PROMPT
    assert (out / "report.html").stat().st_size > 0
