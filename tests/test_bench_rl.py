"""benchmarks/bench_rl.py: both sides get the same settings, the same tokens and the same tool observations."""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from mmsearch.agent.config import AgentConfig
from mmsearch.config import load_config
from mmsearch.rl.config import RLConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_rl

TOOLS = "text_search,image_search,crop"


def _config(mode: str, *extra: str) -> RLConfig:
    args = argparse.Namespace(policy="policy", index="index", data="data", prompts=3, group=4, steps=2, warmup=1,
                              max_new_tokens=40, turns=4, tools=TOOLS)
    cfg = load_config(RLConfig, ROOT / "configs/rl/tiny.yaml", overrides=[*bench_rl.ours_overrides(args, mode), *extra])
    cfg.check()
    return cfg


@pytest.mark.parametrize("mode", ["single", "multi"])
def test_both_sides_train_with_the_same_settings(mode):
    cfg = _config(mode)
    trl = bench_rl.trl_arguments(cfg, mode, "cpu", "out", micro_batch=4)
    a, o, agent = cfg.algorithm, cfg.optim, cfg.rollout.agent
    # one optimizer step over the B x G trajectories of one generation batch, in one pass
    assert trl["per_device_train_batch_size"] * trl["gradient_accumulation_steps"] == 3 * 4
    assert (cfg.rollout.prompts_per_step, cfg.rollout.group_size, trl["num_generations"]) == (3, 4, 4)
    assert (a.ppo_epochs, a.mini_batches, trl["num_iterations"]) == (1, 1, 1)
    assert not a.dynamic_sampling and trl["max_steps"] == cfg.steps == 3
    assert (trl["learning_rate"], trl["adam_beta1"], trl["adam_beta2"]) == (o.lr, *o.betas)
    assert (trl["weight_decay"], trl["max_grad_norm"]) == (o.weight_decay, o.max_grad_norm) == (0, 1.0)
    assert trl["beta"] == a.kl_coef == 0
    assert (trl["epsilon"], trl["epsilon_high"]) == (a.clip_low, a.clip_high)
    assert a.loss_agg == "token-mean" and trl["loss_type"] == "dapo"  # both: mean over the step's generated tokens
    assert trl["temperature"] == agent.sampling.temperature == 1.0 and (trl["top_p"], trl["top_k"]) == (1.0, 0)
    assert trl["generation_kwargs"]["max_new_tokens"] == agent.max_new_tokens_per_turn == 40
    assert not trl["gradient_checkpointing"] and not cfg.gradient_checkpointing and not trl["bf16"]
    assert cfg.rewards.functions == ["answer"] and cfg.rewards.weights == {"exact_match": 1.0}
    if mode == "single":
        assert agent.max_turns == 1 and cfg.rollout.tools.enabled == []
        assert trl["max_completion_length"] == agent.max_new_tokens_per_trajectory == 40
        assert "max_tool_calling_iterations" not in trl
    else:
        assert agent.max_turns == 4 and trl["max_tool_calling_iterations"] == 3
        assert cfg.rollout.tools.enabled == TOOLS.split(",") and agent.max_invalid_streak == 1


def test_a_setting_trl_cannot_mirror_is_refused():
    with pytest.raises(ValueError, match="mini_batches"):
        bench_rl.trl_arguments(_config("single", "algorithm.mini_batches=2"), "single", "cpu", "out")
    with pytest.raises(ValueError, match="whole groups"):
        bench_rl.trl_arguments(_config("single"), "single", "cpu", "out", micro_batch=6)


def test_grpo_config_makes_one_generation_batch_per_optimizer_step(tmp_path):
    trl = pytest.importorskip("trl")
    args = trl.GRPOConfig(**bench_rl.trl_arguments(_config("multi"), "multi", "cpu", str(tmp_path), micro_batch=4))
    assert args.generation_batch_size == 12 and args.steps_per_generation == args.gradient_accumulation_steps == 3
    assert not args.gradient_checkpointing and not args.bf16 and not args.shuffle_dataset


def test_trl_tools_answer_as_our_loop_does(search, policy_dir):
    """The TRL environment's observations: our tool text clipped as our loop clips it, new images numbered after
    the conversation's, the per-tool budget and the image limit."""
    from transformers import AutoProcessor

    from mmsearch.trajectory import TrajectoryBuilder
    from tools.config import ToolsConfig
    from tools.registry import build_toolbox

    builder = TrajectoryBuilder(AutoProcessor.from_pretrained(policy_dir))
    toolbox = build_toolbox(ToolsConfig(enabled=TOOLS.split(",")), search)
    agent = AgentConfig(max_calls_per_tool={"text_search": 1, "crop": 3}, max_tool_response_tokens=6, max_images=2)
    env = bench_rl.tool_environment(toolbox, agent, builder, defaultdict(float))()
    assert sorted(n for n in dir(env) if not n.startswith("_")) == ["crop", "image_search", "reset", "text_search"]
    env.reset(images=[Image.new("RGB", (112, 84), "red")], answers=["x"])
    expected = builder.clip_text(toolbox.call("text_search", {"query": "capital"}).text, 6)
    assert env.text_search(query="capital") == expected and "truncated" in expected
    budget = "Error: text_search may be called at most 1 times; answer with what you have"  # AgentLoop's words
    assert env.text_search(query="capital") == builder.clip_text(budget, 6)
    agent.max_tool_response_tokens = 100
    crop = env.crop(image=0, bbox=[0, 0, 56, 56])
    assert crop[0] == {"type": "text", "text": "Cropped image 0 at [0, 0, 56, 56] -> [image 1]"}
    assert crop[1]["type"] == "image" and crop[1]["image"].size == (56, 56)
    assert "limit 2" in env.crop(image=1, bbox=[0, 0, 28, 28])  # a third image: over max_images
    assert env.crop(image=5, bbox=[0, 0, 1, 1]) == (  # our toolbox's error, counting the crop's new image
        "Error: crop: image 5 does not exist; images in this conversation are numbered 0 to 1")


def test_trl_refuses_qwen25vl_tools_as_shipped_and_sees_our_tokens_with_the_bench_template(policy_dir, tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoProcessor
    from trl import GRPOConfig, GRPOTrainer
    from trl.chat_template_utils import qwen3_template

    from mmsearch.example import Example
    from mmsearch.protocols.qwen_tools import system_prompt
    from mmsearch.training.model import load_policy
    from mmsearch.trajectory import TrajectoryBuilder
    from tools.config import ToolsConfig
    from tools.registry import build_toolbox

    cfg = _config("multi", f"model={policy_dir}", "rollout.tools.enabled=[crop]")
    processor = AutoProcessor.from_pretrained(policy_dir)
    toolbox = build_toolbox(ToolsConfig(enabled=["crop"]), None)
    environment = bench_rl.tool_environment(toolbox, cfg.rollout.agent, TrajectoryBuilder(processor), defaultdict(float))
    image = Image.new("RGB", (112, 84), "red")
    system = system_prompt(toolbox.schemas())

    def trainer():
        return GRPOTrainer(
            model=load_policy(str(policy_dir), "cpu", cfg.lora, cfg.freeze),
            reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
            args=GRPOConfig(**bench_rl.trl_arguments(cfg, "multi", "cpu", str(tmp_path))),
            train_dataset=Dataset.from_dict({"prompt": [[{"role": "user", "content": "q"}]] * 4, "images": [[image]] * 4}),
            processing_class=processor, environment_factory=environment)

    with pytest.raises(ValueError, match="does not support tool calling"):  # the reason the docstring gives
        trainer()
    processor.chat_template = bench_rl.TRL_TOOL_TEMPLATE
    processor.tokenizer.response_template = qwen3_template
    grpo = trainer()
    example = Example("e0", "What is in the top left?", [image], ["red"])
    bench_rl.check_same_tokens(grpo, AutoProcessor.from_pretrained(policy_dir), system, example, ["crop"])
    processor.chat_template = bench_rl.TRL_TOOL_TEMPLATE.replace("<tool_response>\n", "<tool_response>")
    with pytest.raises(RuntimeError, match="differ from ours"):  # the check has teeth
        bench_rl.check_same_tokens(grpo, AutoProcessor.from_pretrained(policy_dir), system, example, ["crop"])
