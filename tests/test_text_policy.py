"""Text-only policies (issue 15): a causal LM with a tokenizer through the same builder, hf engine, SFT and RL.

The tiny text-only policy (`mmsearch model init-tiny --text-only`: the VL policy's tokenizer and decoder as
a Qwen2 causal LM) with the real text_search tool over the small world: token-exact trajectories
(invariants 1-2), engine and trainer log-probs that agree (invariant 4), the KV cache reused across turns,
SFT and RL steps, and the clear refusals where images would be needed.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from rl_test_rewards import REWARD_OVERRIDES
from trajectory_checks import assert_token_exact, masked_runs

from mmsearch.agent.config import AgentConfig, SamplingConfig
from mmsearch.agent.loop import AgentLoop
from mmsearch.engines.base import GenerationOutput
from mmsearch.engines.hf import HFEngine
from mmsearch.engines.scripted import ScriptedEngine, replay
from mmsearch.example import Example
from mmsearch.logprobs import TokenScorer, collate, token_logprobs
from mmsearch.model.policy import TextOnlyError, TextProcessor
from mmsearch.protocols.qwen_tools import format_tool_call, format_turn
from mmsearch.trajectory import TrajectoryBuilder, assistant_turn_ids
from tools.config import ToolsConfig
from tools.registry import build_toolbox


def _call(name, **arguments):
    return format_turn(f"I will use {name}.", format_tool_call(name, arguments))


def _answer(text):
    return format_turn("I know it now.", f"<answer>{text}</answer>")


@pytest.fixture(scope="module")
def text_policy_dir(world_dir, tmp_path_factory) -> Path:
    """`mmsearch model init-tiny --text-only` on the small world, through the CLI."""
    from mmsearch.cli.main import main

    out = tmp_path_factory.mktemp("text_policy") / "tiny_text"
    assert main(["model", "init-tiny", "--text-only", "--kb", str(world_dir), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def text_engine(text_policy_dir) -> HFEngine:
    return HFEngine.from_pretrained(str(text_policy_dir), device="cpu")


@pytest.fixture(scope="module")
def text_toolbox(search):
    return build_toolbox(ToolsConfig(enabled=["text_search"]), search)


@pytest.fixture(scope="module")
def nations(world_dir) -> list[dict]:
    records = [json.loads(line) for line in (world_dir / "entities.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "nation"]


# -- the checkpoint ---------------------------------------------------------------------------------

def test_init_tiny_text_only_loads_with_the_auto_classes(text_policy_dir, policy_dir):
    from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer, Qwen2ForCausalLM

    from mmsearch.model.tiny import CHAT_TEMPLATE

    model = AutoModelForCausalLM.from_pretrained(text_policy_dir)
    tokenizer = AutoTokenizer.from_pretrained(text_policy_dir)
    assert isinstance(model, Qwen2ForCausalLM) and getattr(model.config, "vision_config", None) is None
    assert tokenizer.chat_template == CHAT_TEMPLATE  # the VL policy's template, prefix-stable
    # the same tokenizer code on the same KB: the very vocabulary of the VL policy
    assert tokenizer.get_vocab() == AutoProcessor.from_pretrained(policy_dir).tokenizer.get_vocab()
    assert model.config.vocab_size == len(tokenizer)
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_text_processor_flattens_parts_and_refuses_images(text_engine):
    processor = text_engine.processor
    assert isinstance(processor, TextProcessor) and processor.image_processor is None
    parts = [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": "Which "}, {"type": "text", "text": "nation?"}]}]
    as_strings = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which nation?"}]
    assert (processor.apply_chat_template(parts, tokenize=False, add_generation_prompt=True)
            == processor.tokenizer.apply_chat_template(as_strings, tokenize=False, add_generation_prompt=True))
    with pytest.raises(TextOnlyError, match="text-only"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], tokenize=False)
    builder = TrajectoryBuilder(processor.tokenizer)  # a bare tokenizer works too
    assert builder.text_only and builder.image_token_id is None and builder.vision_start_id is None
    with pytest.raises(TextOnlyError, match="cannot read images"):
        builder.start("e", 0, "You are a test.", "Which nation?", [Image.new("RGB", (32, 32))])


# -- token-exact trajectories with the real text_search (invariants 1-2) -------------------------------

SCRIPTS = {
    0: [],
    1: [_call("text_search", query="capital of Ibrovova")],
    2: [_call("text_search", query="Ibrovova currency"), _call("text_search", query="Reisos", k=2)],
}


@pytest.fixture(scope="module")
def scripted(text_engine, text_toolbox):
    builder = TrajectoryBuilder(text_engine.processor)
    turns = {f"ex{k}": [*calls, _answer("Ibrovova")] for k, calls in SCRIPTS.items()}
    loop = AgentLoop(ScriptedEngine(text_engine.tokenizer, replay(turns)), text_toolbox, builder, AgentConfig(max_turns=6))
    examples = [Example(f"ex{k}", "Which nation uses the trudai?", [], ["Ibrovova"]) for k in SCRIPTS]
    return builder, turns, loop.run(examples)


@pytest.mark.parametrize("n_calls", sorted(SCRIPTS))
def test_token_ids_equal_the_chat_template_rendering(scripted, n_calls):
    builder, _, trajectories = scripted
    traj = trajectories[n_calls]
    assert traj.stop_reason == "answered" and not traj.images and not traj.pixel_values
    assert len(traj.tool_calls) == n_calls and not any(c.is_error for c in traj.tool_calls)
    assert all("Ibrovova" in c.result or "Reisos" in c.result for c in traj.tool_calls)  # real passages came back
    text = builder.render(traj.messages, add_generation_prompt=False)
    expected = builder.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert traj.token_ids == expected[: len(traj.token_ids)]
    assert builder.tokenizer.decode(expected[len(traj.token_ids):]) == "\n"


@pytest.mark.parametrize("n_calls", sorted(SCRIPTS))
def test_loss_mask_is_one_exactly_on_generated_tokens(scripted, n_calls):
    builder, turns, trajectories = scripted
    traj = trajectories[n_calls]
    generated = [assistant_turn_ids(builder.tokenizer, t, builder.end_of_turn_id) for t in turns[f"ex{n_calls}"]]
    assert masked_runs(traj) == generated


# Written in the shape of text-only instruct templates (Qwen2.5's, Llama's): `message.content` is concatenated
# as a string, so a list of parts cannot be rendered at all.
STRING_ONLY_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_a_string_only_chat_template_renders_token_exact_trajectories(text_policy_dir, text_toolbox):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(text_policy_dir)
    tokenizer.chat_template = STRING_ONLY_TEMPLATE
    with pytest.raises(TypeError):  # what the builder would hit without joining the parts
        tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], tokenize=False)
    builder = TrajectoryBuilder(tokenizer)
    turns = {"e": [_call("text_search", query="Ibrovova currency"), _answer("trudai")]}
    loop = AgentLoop(ScriptedEngine(tokenizer, replay(turns)), text_toolbox, builder, AgentConfig())
    [traj] = loop.run([Example("e", "What currency does Ibrovova use?", [], ["trudai"])])
    assert traj.stop_reason == "answered" and not traj.tool_calls[0].is_error
    expected = tokenizer(builder.render(traj.messages, add_generation_prompt=False), add_special_tokens=False)["input_ids"]
    assert traj.token_ids == expected[: len(traj.token_ids)] and tokenizer.decode(expected[len(traj.token_ids):]) == "\n"


# -- the hf engine: rollouts, turn cache, engine vs trainer log-probs (invariant 4) ---------------------

class ScriptedFirstTurn:
    """The first turn of every trajectory is a scripted text_search call; the policy writes the rest.

    Records every output the policy generated, so the test can check they entered the trajectory verbatim.
    """

    token_level = True

    def __init__(self, engine: HFEngine):
        self.engine, self.generated = engine, []
        self.processor = engine.processor
        self.end_id = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def reset(self) -> None:
        self.engine.reset()

    def generate(self, requests, params, stop_token_ids):
        first = [not r.trajectory.turns for r in requests]
        policy = [r for r, f in zip(requests, first) if not f]
        generated = iter(self.engine.generate(policy, params, stop_token_ids) if policy else [])
        outputs = []
        for request, f in zip(requests, first):
            if f:
                ids = assistant_turn_ids(self.engine.tokenizer, _call("text_search", query=request.trajectory.example_id),
                                         self.end_id)
                outputs.append(GenerationOutput(ids, [0.0] * len(ids), "stop"))
            else:
                outputs.append(next(generated))
                self.generated.append(outputs[-1])
        return outputs


def _rollout(engine, toolbox, nations, temperature=1.0):
    cfg = AgentConfig(max_turns=4, max_new_tokens_per_turn=10, sampling=SamplingConfig(temperature=temperature, seed=3))
    examples = [Example(n["name"], f"What currency does {n['name']} use?", [], [n["facts"]["currency"]])
                for n in nations[:2]]
    wrapped = ScriptedFirstTurn(engine)
    trajectories = AgentLoop(wrapped, toolbox, TrajectoryBuilder(engine.processor), cfg).run(examples, n_samples=2)
    return trajectories, wrapped.generated


@pytest.fixture(scope="module")
def hf_rollouts(text_engine, text_toolbox, nations):
    return _rollout(text_engine, text_toolbox, nations)


def test_hf_rollout_keeps_generated_tokens_verbatim_and_renders_as_the_template(hf_rollouts, text_engine):
    trajectories, generated = hf_rollouts
    builder = TrajectoryBuilder(text_engine.processor)
    tok = text_engine.tokenizer
    assert len(trajectories) == 4 and all(len(t.turns) >= 3 for t in trajectories)  # at least two policy turns each
    assert all(t.tool_calls[0].name == "text_search" and not t.tool_calls[0].is_error for t in trajectories)
    policy_runs = [run for t in trajectories for run in masked_runs(t)[1:]]
    assert sorted(map(tuple, policy_runs)) == sorted(tuple(out.token_ids) for out in generated)
    for traj in trajectories:
        assert len(traj.token_ids) == len(traj.loss_mask) == len(traj.logprobs)
        # invariant 1: the sequence is the template's rendering of the messages (sampled tokens need not be the
        # canonical tokenization of their text, so the check is on the text), and every prompt or tool delta is
        # the tokenizer's own tokenization of its text
        rendered = builder.render(traj.messages, add_generation_prompt=not traj.done or traj.turns[-1].action != "answer")
        assert rendered.startswith(tok.decode(traj.token_ids, skip_special_tokens=False))
        for run in masked_runs(traj, value=0):
            assert run == tok(tok.decode(run, skip_special_tokens=False), add_special_tokens=False)["input_ids"]


def test_engine_logprobs_equal_the_trainers(hf_rollouts, text_engine):
    trajectories, _ = hf_rollouts
    batch = collate(trajectories, text_engine.pad_id, None)
    assert "mm_token_type_ids" not in batch and "pixel_values" not in batch
    # only the policy's turns carry engine log-probs (the scripted first turn's are 0)
    policy = torch.zeros_like(batch["loss_mask"], dtype=torch.bool)
    for row, traj in enumerate(trajectories):
        first_end = traj.loss_mask.index(0, traj.loss_mask.index(1))
        policy[row, first_end:len(traj.token_ids)] = batch["loss_mask"][row, first_end:len(traj.token_ids)].bool()
    assert policy.sum() > 20
    rollout = batch["rollout_logprobs"][policy]
    with torch.no_grad():
        full = token_logprobs(text_engine.model, batch)[policy]
        shared, _ = TokenScorer(text_engine.model, share_prefix=True)(batch)
        unshared, _ = TokenScorer(text_engine.model, share_prefix=False)(batch)
    from mmsearch.logprobs import shared_prefix_len

    assert shared_prefix_len(batch, ()) > 32  # the system prompt is run once for every row
    for recomputed in (full, shared[policy], unshared[policy]):
        assert (recomputed - rollout).abs().max().item() < 1e-4


def test_turn_cache_gives_what_reencoding_gives(text_engine, text_toolbox, nations):
    """The KV cache kept across turns (1-D positions) equals generate() over whole contexts, and is used."""
    config = copy.deepcopy(text_engine.model.config)  # full attention: padded generate() is exact only without windows
    config.layer_types = ["full_attention"] * config.num_hidden_layers
    config.use_sliding_window, config.sliding_window = False, None
    model = type(text_engine.model)(config).eval()
    model.load_state_dict(text_engine.model.state_dict())
    runs = {}
    for cache_turns in (True, False):
        engine = HFEngine(model, text_engine.processor, cache_turns=cache_turns)
        encoded: list[int] = []
        hook = model.register_forward_pre_hook(lambda m, a, kw, log=encoded: log.append(kw["input_ids"].numel()),
                                               with_kwargs=True)
        try:
            runs[cache_turns] = (_rollout(engine, text_toolbox, nations)[0], sum(encoded))
        finally:
            hook.remove()
    (cached, cached_positions), (reference, reference_positions) = runs[True], runs[False]
    for a, b in zip(cached, reference, strict=True):
        assert a.token_ids == b.token_ids and a.loss_mask == b.loss_mask
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)
    assert cached_positions < reference_positions / 2


# -- SFT and RL on the text-only policy ------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_gold(text_engine, text_toolbox, nations, world_dir, tmp_path_factory) -> Path:
    """A hand-made text-only gold set: search the nation's currency, answer it (real tool results).

    Half the records say `"images": []`, half have no image field; one more carries an image (skipped)."""
    builder = TrajectoryBuilder(text_engine.processor)
    chosen = nations[:8]  # the small world has 4
    turns = {n["name"]: [_call("text_search", query=f"{n['name']} currency"), _answer(n["facts"]["currency"])]
             for n in chosen}
    examples = [Example(n["name"], f"What currency does {n['name']} use?", [], [n["facts"]["currency"]]) for n in chosen]
    loop = AgentLoop(ScriptedEngine(text_engine.tokenizer, replay(turns)), text_toolbox, builder, AgentConfig())
    out = tmp_path_factory.mktemp("text_gold") / "gold.jsonl"
    records = []
    for i, (example, traj) in enumerate(zip(examples, loop.run(examples))):
        assert traj.stop_reason == "answered"
        record = {"id": example.id, "question": example.question, "answers": example.answers, "messages": traj.messages}
        records.append({**record, "images": []} if i % 2 else record)
    scene = json.loads((world_dir / "scenes.jsonl").read_text().splitlines()[0])
    records.append({**records[0], "id": "with-image", "image": str(world_dir / scene["path"])})
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def test_sft_steps_lower_the_loss_and_save_a_causal_lm(text_policy_dir, text_gold, index_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmsearch.sft.config import SFTConfig
    from mmsearch.sft.train import train_sft

    cfg = SFTConfig(model=str(text_policy_dir), data=str(text_gold), out=str(tmp_path / "sft"), max_steps=6, log_every=1)
    cfg.batch.tokens_per_batch, cfg.batch.max_seq_tokens = 2048, 2048
    cfg.optim.lr, cfg.optim.warmup_steps = 3e-3, 1
    cfg.eval.index = str(index_dir)
    with pytest.raises(ValueError, match=r"image_search, crop.*eval\.tools\.enabled=\[text_search\]"):
        train_sft(cfg, progress=False)  # refused before any training, not at the first eval
    cfg.eval.tools.enabled = ["text_search"]
    cfg.eval.limit, cfg.eval.agent.max_turns, cfg.eval.agent.max_new_tokens_per_turn = 2, 1, 8
    result = train_sft(cfg, progress=False)
    out = Path(cfg.out)
    report = json.loads((out / "data_report.json").read_text())
    n_gold = len(text_gold.read_text().splitlines()) - 1
    assert n_gold >= 4 and report["samples"] == n_gold and report["skipped"] == {"has_image": 1}
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in train if r["kind"] == "train"]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5, losses
    assert result["eval"]["overall"]["n_questions"] == 2
    AutoModelForCausalLM.from_pretrained(out / "final")
    assert AutoTokenizer.from_pretrained(out / "final").chat_template


RL_ALGORITHMS = {
    "grpo": [],
    "ppo_kl": ["algorithm.advantage=gae", "rollout.group_size=1", "algorithm.kl_coef=0.01", "critic.lr=1e-3"],
}


@pytest.mark.parametrize("algorithm", sorted(RL_ALGORITHMS))
def test_one_rl_step_runs_with_text_search(algorithm, text_policy_dir, text_gold, index_dir, tmp_path):
    """GRPO, and PPO with a critic and a reference model (each loaded as the causal LM it is)."""
    from transformers import AutoModelForCausalLM

    from mmsearch.config import load_config
    from mmsearch.rl.config import RLConfig
    from mmsearch.rl.train import train_rl
    from mmsearch.training.metrics import read_metrics

    overrides = [f"model={text_policy_dir}", f"data={text_gold}", f"index={index_dir}", f"out={tmp_path / 'rl'}",
                 "device=cpu", "steps=1", "rollout.prompts_per_step=2", "rollout.group_size=2",
                 "rollout.agent.max_turns=2", "rollout.agent.max_new_tokens_per_turn=12",
                 "rollout.agent.max_new_tokens_per_trajectory=24", "rollout.tools.default_k=2", "eval.enabled=false",
                 "optim.lr=1e-4", "guard.enabled=false", "algorithm.tokens_per_micro_batch=4096", *REWARD_OVERRIDES,
                 *RL_ALGORITHMS[algorithm]]
    if algorithm == "grpo":
        with pytest.raises(ValueError, match=r"rollout\.tools\.enabled=\[text_search\]"):
            train_rl(load_config(RLConfig, overrides=overrides), progress=False)
    cfg = load_config(RLConfig, overrides=[*overrides, "rollout.tools.enabled=[text_search]"])
    train_rl(cfg, progress=False)
    [record] = [r for r in read_metrics(tmp_path / "rl" / "metrics.jsonl") if r["kind"] == "train"]
    assert record["trajectories"] == 2.0 * cfg.rollout.group_size and "grad_norm" in record
    assert record["mismatch/ratio_mean"] == pytest.approx(1.0, abs=1e-3)  # invariant 4, measured by the trainer
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "rl" / "final")
    if algorithm == "ppo_kl":  # the critic warms up first: only it trains in step 1
        assert record["value_loss"] > 0 and (tmp_path / "rl" / "final" / "trainer_state" / "critic.pt").is_file()
    else:
        assert not torch.equal(AutoModelForCausalLM.from_pretrained(text_policy_dir).lm_head.weight, after.lm_head.weight)


def test_lora_adapts_the_decoder_layers(text_policy_dir):
    from mmsearch.training.config import FreezeConfig, LoraConfig
    from mmsearch.training.model import load_policy

    model = load_policy(str(text_policy_dir), "cpu", LoraConfig(r=4), FreezeConfig(vision_tower=True))
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in name and ".layers." in name for name in trained)


# -- eval and ask: image tools refused, imageless examples work ----------------------------------------------

def _eval_cfg(text_policy_dir, index_dir, data, out, tools=("text_search",)):
    from mmsearch.eval.run import EvalConfig

    cfg = EvalConfig(data=str(data), out=str(out), index=str(index_dir))
    cfg.engine.model, cfg.engine.device = str(text_policy_dir), "cpu"
    cfg.tools.enabled = list(tools)
    cfg.agent = dataclasses.replace(cfg.agent, max_turns=2, max_new_tokens_per_turn=8)
    return cfg


def test_image_tools_are_refused_at_start_up(text_policy_dir, index_dir, text_gold, tmp_path, monkeypatch):
    from mmsearch.agent.api import Agent
    from mmsearch.eval.run import run_eval
    from mmsearch.model import policy

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the tools were checked")

    monkeypatch.setattr(policy, "load_model", no_weights)
    cfg = _eval_cfg(text_policy_dir, index_dir, text_gold, tmp_path / "eval", tools=("text_search", "image_search", "crop"))
    with pytest.raises(ValueError, match=r"text-only.*image_search, crop.*tools\.enabled=\[text_search\]"):
        run_eval(cfg, progress=False)
    with pytest.raises(ValueError, match=r"crop.*tools\.enabled=\[text_search\]"):
        Agent.from_pretrained(text_policy_dir, index=index_dir, device="cpu", tools=["text_search", "crop"])


def test_eval_runs_imageless_examples_and_counts_those_with_images(text_policy_dir, index_dir, text_gold, tmp_path):
    from mmsearch.eval.run import run_eval

    summary = run_eval(_eval_cfg(text_policy_dir, index_dir, text_gold, tmp_path / "eval"), progress=False)
    n_gold = len(text_gold.read_text().splitlines()) - 1
    assert summary["loaded"] == {"examples": n_gold, "skipped": {"has_image": 1}}
    records = [json.loads(line) for line in (tmp_path / "eval" / "trajectories.jsonl").read_text().splitlines()]
    assert len(records) == n_gold and all(r["n_images"] == 0 and r["token_exact"] for r in records)


def test_ask_takes_a_question_without_an_image(text_policy_dir, index_dir, world_dir):
    from mmsearch.agent.api import Agent

    agent = Agent.from_pretrained(text_policy_dir, index=index_dir, device="cpu", tools=["text_search"], max_turns=2,
                                  temperature=0, max_new_tokens_per_turn=8)
    result = agent.ask(None, "What currency does Ibrovova use?")
    assert result.stop_reason is not None and result.images == []
    events = list(agent.stream(None, "What currency does Reisos use?"))
    assert events[0].kind == "start" and events[0].images == [] and events[-1].kind == "done"
    with pytest.raises(TextOnlyError, match="cannot read images"):
        agent.ask(Image.new("RGB", (64, 48)), "Which nation is this?")


def test_the_ask_command_without_an_image_and_an_image_refused(text_policy_dir, index_dir, world_dir, capsys):
    from mmsearch.cli.main import main

    policy = ["--model", str(text_policy_dir), "--index", str(index_dir), "engine.device=cpu", "agent.max_turns=1",
              "agent.max_new_tokens_per_turn=8"]
    assert main(["ask", "What currency does Ibrovova use?", *policy, "tools.enabled=[text_search]"]) == 0
    assert "question: What currency does Ibrovova use?" in capsys.readouterr().out
    scene = json.loads((world_dir / "scenes.jsonl").read_text().splitlines()[0])
    assert main(["ask", "Which nation?", "--image", str(world_dir / scene["path"]), *policy]) == 2
    assert "cannot read images" in capsys.readouterr().err
    assert main(["ask", "What currency does Ibrovova use?", *policy]) == 2  # all three tools: refused
    assert "tools.enabled=[text_search]" in capsys.readouterr().err


def test_vllm_prompts_of_a_text_policy_carry_no_images(text_policy_dir, text_engine):
    """The vLLM engine's pure parts on a text-only checkpoint: no placeholder id, prompts are the ids."""
    from mmsearch.engines.base import GenerationRequest
    from mmsearch.engines.vllm_engine import build_prompt, placeholder_config

    image_token_id, merge_size = placeholder_config(str(text_policy_dir))
    assert (image_token_id, merge_size) == (None, 1)
    ids = text_engine.tokenizer("Who founded Ibrovova?", add_special_tokens=False)["input_ids"]
    prompt, sent = build_prompt(GenerationRequest(ids), image_token_id, merge_size)
    assert prompt == {"prompt_token_ids": ids} and sent == ids


# -- the papers' protocols with a text-only policy --------------------------------------------------

@pytest.mark.parametrize("name", ["qwen_tools", "search_r1", "r1_searcher"])
def test_text_policy_rollouts_are_token_exact_in_every_text_protocol(text_engine, search, nations, name):
    from mmsearch.agent.setup import protocol_for
    from mmsearch.protocols import Action, get_protocol

    protocol = get_protocol(name)
    cfg = ToolsConfig(enabled=["text_search"])
    protocol_for(AgentConfig(protocol=name), cfg)
    builder = TrajectoryBuilder(text_engine.processor, protocol=protocol)
    nation = nations[0]
    actions = [Action("tool_call", thinking="Look it up.", name="text_search", arguments={"query": f"{nation['name']} currency"}),
               Action("tool_call", thinking="And the capital.", name="text_search", arguments={"query": f"capital {nation['name']}"}),
               Action("answer", thinking="Found it.", answer=nation["facts"]["currency"])]
    turns = [protocol.format_action(a) for a in actions]
    loop = AgentLoop(ScriptedEngine(text_engine.tokenizer, replay({"ex": turns})), build_toolbox(cfg, search), builder,
                     AgentConfig(protocol=name))
    traj = loop.run([Example("ex", f"What currency does {nation['name']} use?", [], [nation["facts"]["currency"]])])[0]
    assert traj.stop_reason == "answered" and traj.images == [] and traj.protocol == name
    assert [c.name for c in traj.tool_calls] == ["text_search", "text_search"] and not any(c.is_error for c in traj.tool_calls)
    assert_token_exact(protocol, builder, turns, traj)


def test_eval_of_the_text_policy_on_flashrag_files_in_search_r1(text_policy_dir, index_dir, nations, world_dir, tmp_path):
    """`mmsearch eval --protocol search_r1` on a FlashRAG folder: Search-R1's prompt and layout, EM per dataset."""
    from mmsearch.cli.main import main
    from mmsearch.protocols.search_r1 import PROMPT

    names = {json.loads(line)["id"]: json.loads(line)["name"] for line in (world_dir / "entities.jsonl").read_text().splitlines()}
    data = tmp_path / "flashrag"
    for dataset, rows in {
        "nq": [{"id": f"test_{i}", "question": f"what currency does {n['name']} use", "golden_answers": [n["facts"]["currency"]]}
               for i, n in enumerate(nations)],
        "hotpotqa": [{"id": f"test_{i}", "question": f"What is the capital of {n['name']}?",
                      "golden_answers": [names[n["relations"]["capital"]]], "metadata": {"type": "bridge"}}
                     for i, n in enumerate(nations) if "capital" in n.get("relations", {})],
    }.items():
        (data / dataset).mkdir(parents=True)
        (data / dataset / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval"
    assert main(["eval", "--protocol", "search_r1", "--model", str(text_policy_dir), "--index", str(index_dir),
                 "--data", str(data), "--split", "test", "--out", str(out), "engine.device=cpu", "agent.max_turns=2",
                 "agent.max_new_tokens_per_turn=12", "agent.sampling.temperature=0", "tools.default_k=3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["by_dataset"]) == {"hotpotqa", "nq"}
    assert summary["dataset_average"]["n_datasets"] == 2
    records = [json.loads(line) for line in (out / "trajectories.jsonl").read_text().splitlines()]
    assert {r["protocol"] for r in records} == {"search_r1"} and all(r["n_images"] == 0 for r in records)
    first = records[0]["messages"][0]
    assert first["role"] == "user" and first["content"][-1]["text"].startswith(PROMPT.split("{question}")[0])
    assert first["content"][-1]["text"].endswith("?\n")  # Search-R1 ends every question with "?"
    assert "By dataset" in (out / "report.md").read_text()
