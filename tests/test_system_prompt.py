"""A policy's own system prompt: `agent.system_prompt`, recorded in the policy's config by `init-tiny`.

The tiny policy learns the protocol from its gold trajectories, so the 640-token schema prompt is cost
without information for it; it is trained and served a short prompt instead. The prompt must then be the
same in every stage: the gold rows synth writes for the policy, SFT's samples and its saved checkpoints,
eval, ask and RL. These tests follow it through each, with the real tools and tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from rl_test_rewards import REWARD_OVERRIDES

from mmsearch.agent.config import AgentConfig, EngineConfig, SamplingConfig
from mmsearch.agent.setup import RolloutConfig, build_loop
from mmsearch.config import load_config
from mmsearch.model.policy import SYSTEM_PROMPTS_KEY, recorded_system_prompt
from mmsearch.protocols.base import custom_system_prompt
from tools.config import ToolsConfig
from tools.registry import tool_schemas

PROMPT = "You answer questions about images. Tools: {tools}. Every turn: <think>...</think> then one action."


def test_the_tools_placeholder_lists_the_enabled_tools_and_other_braces_stay():
    schemas = tool_schemas(ToolsConfig(enabled=["text_search", "crop"]))
    text = custom_system_prompt('Tools: {tools}. Call them as {"name": ..., "arguments": {...}}.', schemas)
    assert text == 'Tools: text_search(query, k), crop(image, bbox). Call them as {"name": ..., "arguments": {...}}.'


@pytest.fixture(scope="module")
def prompted_policy(world_dir, tmp_path_factory) -> Path:
    """`mmsearch model init-tiny ... system_prompt=...` through the CLI."""
    from mmsearch.cli.main import main

    out = tmp_path_factory.mktemp("prompted") / "tiny"
    assert main(["model", "init-tiny", "--kb", str(world_dir), "--out", str(out), f"system_prompt='{PROMPT}'"]) == 0
    return out


def test_init_tiny_records_the_prompt_and_trains_the_tokenizer_on_it(prompted_policy, policy_dir):
    from transformers import AutoProcessor

    assert json.loads((prompted_policy / "config.json").read_text())[SYSTEM_PROMPTS_KEY] == {"qwen_tools": PROMPT}
    assert recorded_system_prompt(prompted_policy, "qwen_tools") == PROMPT
    # written for one protocol: another protocol keeps its own prompt (Search-R1's is in the user turn)
    assert recorded_system_prompt(prompted_policy, "search_r1") == ""
    assert recorded_system_prompt(policy_dir, "qwen_tools") == ""
    assert recorded_system_prompt("Qwen/Qwen2.5-VL-3B-Instruct", "qwen_tools") == ""
    rendered = custom_system_prompt(PROMPT, tool_schemas(ToolsConfig()))
    ours = AutoProcessor.from_pretrained(prompted_policy).tokenizer
    default = AutoProcessor.from_pretrained(policy_dir).tokenizer
    # its merges went to the prompt it will read in every sample, not to the schema prompt it never sees
    assert len(ours(rendered)["input_ids"]) < len(default(rendered)["input_ids"])


def _loop(policy: Path, index_dir: Path, system_prompt: str = ""):
    agent = AgentConfig(system_prompt=system_prompt, max_turns=1, max_new_tokens_per_turn=4,
                        sampling=SamplingConfig(temperature=0.0))
    return build_loop(RolloutConfig(engine=EngineConfig(model=str(policy), device="cpu"), agent=agent,
                                    index=str(index_dir)))


def test_eval_and_ask_serve_the_policy_its_recorded_prompt(prompted_policy, policy_dir, index_dir):
    from mmsearch.example import Example

    loop = _loop(prompted_policy, index_dir)
    expected = "You answer questions about images. Tools: text_search(query, k), image_search(image, k), crop(image, bbox)."
    assert loop.system.startswith(expected)
    traj = loop.run([Example("q", "Whose seal is this?", [Image.new("RGB", (64, 64), "red")], ["x"])])[0]
    text = loop.builder.tokenizer.decode(traj.token_ids)
    assert text.startswith(f"<|im_start|>system\n{loop.system}<|im_end|>") and "<tools>" not in text
    # a prompt the user names wins; a policy that records none gets the protocol's schema prompt
    assert _loop(prompted_policy, index_dir, "Be brief. {tools}").system.startswith("Be brief. text_search(query, k)")
    assert "<tools>" in _loop(policy_dir, index_dir).system


def test_synth_sft_and_rl_keep_the_prompt_through_every_stage(prompted_policy, policy_dir, world_dir, index_dir,
                                                                 tmp_path):
    from data_pipeline.synth.config import SynthConfig
    from data_pipeline.synth.run import run_synth
    from mmsearch.rl.config import RLConfig
    from mmsearch.rl.train import train_rl
    from mmsearch.sft.config import SFTConfig
    from mmsearch.sft.train import train_sft

    data = tmp_path / "gold"
    run_synth(SynthConfig(kb=str(world_dir), index=str(index_dir), out=str(data), n=12, seed=3, chunk=12,
                          processor=str(prompted_policy)), progress=False)
    from datasets import load_from_disk

    rows = load_from_disk(str(data))["train"]
    systems = {json.loads(m)[0]["content"] for m in rows["messages"]}
    assert len(systems) == 1
    trained = systems.pop()
    assert trained.startswith("You answer questions about images. Tools: text_search")

    sft = SFTConfig(model=str(prompted_policy), data=str(data), out=str(tmp_path / "sft"), max_steps=2, log_every=1)
    sft.batch.tokens_per_batch = sft.batch.max_seq_tokens = 4096
    sft.eval.enabled = False
    train_sft(sft, progress=False)
    final = tmp_path / "sft" / "final"
    assert recorded_system_prompt(final, "qwen_tools") == PROMPT  # the checkpoint carries it on
    report = json.loads((tmp_path / "sft" / "data_report.json").read_text())
    assert report["system_prompt_mismatch"] == 0
    # the same rows for a policy that records no prompt: it would be served the schema prompt, and SFT says so
    other = SFTConfig(model=str(policy_dir), data=str(data), out=str(tmp_path / "other"), max_steps=1)
    other.batch.tokens_per_batch = other.batch.max_seq_tokens = 4096
    other.eval.enabled = False
    train_sft(other, progress=False)
    assert json.loads((tmp_path / "other" / "data_report.json").read_text())["system_prompt_mismatch"] == len(rows)

    out = tmp_path / "rl"
    rl = load_config(RLConfig, overrides=[f"model={final}", f"data={data}", f"index={index_dir}", f"out={out}",
                                          "device=cpu", "steps=1", "rollout.prompts_per_step=2", "rollout.group_size=2",
                                          "rollout.agent.max_turns=1", "rollout.agent.max_new_tokens_per_turn=4",
                                          "eval.enabled=false", "guard.enabled=false", *REWARD_OVERRIDES])
    train_rl(rl, progress=False)
    lines = (out / "trajectories" / "step-000001.jsonl").read_text().splitlines()
    assert lines and {json.loads(line)["messages"][0]["content"] for line in lines} == {trained}
    assert recorded_system_prompt(out / "final", "qwen_tools") == PROMPT
