"""RL with the colocated `vllm` engine: what runs without vLLM on a CPU, and two real steps on a GPU.

On the CPU: the names the trainer pushes against vLLM's own rename rules for Qwen2-VL, Qwen2.5-VL and
Qwen3-VL (transformers 5.x models, plain and with LoRA), chunking, the push (names checked before
anything loads, tied weights once, every engine parameter covered), the config's refusals, and
`Rollouts.push_weights` on the hf engine. The push's target is `RecordingModel`, a stand-in for vLLM's
model class only: it exposes `load_weights(weights) -> set[str]` as vLLM's does and records what it
receives. The GPU test runs `mmsearch rl` for two steps with vLLM when vLLM and CUDA are there.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from mmsearch.config import load_config
from mmsearch.engines.vllm_weights import PushReport, chunk_weights, push_weights, vllm_weight_name
from mmsearch.rl.config import RLConfig
from mmsearch.training.model import merged_lora_state, merged_weights

VOCAB, IMAGE, VIDEO, START, END = 320, 310, 311, 312, 313


def _tiny(family: str):
    """A random two-layer Qwen2-VL / Qwen2.5-VL / Qwen3-VL as transformers builds it (its real names)."""
    import transformers

    text = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}}
    vision = {"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_heads": 2}
    if family == "qwen2_vl":
        vision |= {"depth": 1, "embed_dim": 32, "hidden_size": 64}
        classes = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    elif family == "qwen2_5_vl":
        vision |= {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 64,
                   "fullatt_block_indexes": [1]}
        classes = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    else:
        text |= {"head_dim": 16}
        text["rope_parameters"] |= {"mrope_interleaved": True}
        vision |= {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 64,
                   "num_position_embeddings": 256, "deepstack_visual_indexes": [0]}
        classes = transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration
    config = classes[0](text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                        vision_start_token_id=START, vision_end_token_id=END, tie_word_embeddings=True)
    torch.manual_seed(0)
    return classes[1](config)


class RecordingModel:
    """Stand-in for vLLM's model class, for the push only: `load_weights` as vLLM's signature has it.

    It records every call's names, shapes and values, and answers with the vLLM names the tensors
    would load into (vLLM's `AutoWeightsLoader` returns those).
    """

    def __init__(self, architecture: str):
        self.architecture = architecture
        self.calls: list[list[tuple[str, tuple[int, ...]]]] = []
        self.values: dict[str, torch.Tensor] = {}

    def load_weights(self, weights):
        weights = list(weights)
        self.calls.append([(name, tuple(t.shape)) for name, t in weights])
        self.values.update({name: t.clone() for name, t in weights})
        return {vllm_weight_name(name, self.architecture) for name, _ in weights}


# -- names ------------------------------------------------------------------------------------------------

ARCHITECTURES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                 "qwen3_vl": "Qwen3VLForConditionalGeneration"}
# transformers 5.x names -> the names vLLM's hf_to_vllm_mapper gives them, written out by hand
EXPECTED = {
    "model.language_model.embed_tokens.weight": "language_model.model.embed_tokens.weight",
    "model.language_model.layers.1.self_attn.q_proj.weight": "language_model.model.layers.1.self_attn.q_proj.weight",
    "model.language_model.layers.0.mlp.gate_proj.weight": "language_model.model.layers.0.mlp.gate_proj.weight",
    "model.language_model.norm.weight": "language_model.model.norm.weight",
    "model.visual.blocks.0.attn.qkv.weight": "visual.blocks.0.attn.qkv.weight",
    "model.visual.patch_embed.proj.weight": "visual.patch_embed.proj.weight",
    "lm_head.weight": "language_model.lm_head.weight",
}


@pytest.mark.parametrize("family", list(ARCHITECTURES))
def test_every_trainer_weight_has_a_place_in_vllm(family):
    model = _tiny(family)
    architecture = ARCHITECTURES[family]
    assert type(model).__name__ == architecture
    names = set(model.state_dict())
    for hf_name, vllm_name in EXPECTED.items():
        assert hf_name in names, hf_name  # the table is about names transformers really uses
        assert vllm_weight_name(hf_name, architecture) == vllm_name
    mapped = {vllm_weight_name(name, architecture) for name in names}
    assert len(mapped) == len(names)  # no two weights land on one vLLM name
    assert {n.split(".")[0] for n in mapped} == {"visual", "language_model"}


def test_legacy_names_follow_vllms_rules():
    """Checkpoints saved before transformers 4.52 (`model.layers.*`): Qwen2/2.5-VL map them, Qwen3-VL does not."""
    old = "model.layers.0.mlp.up_proj.weight"
    assert vllm_weight_name(old, ARCHITECTURES["qwen2_5_vl"]) == "language_model.model.layers.0.mlp.up_proj.weight"
    assert vllm_weight_name("visual.merger.mlp.0.bias", ARCHITECTURES["qwen2_vl"]) == "visual.merger.mlp.0.bias"
    with pytest.raises(ValueError, match="no place in vLLM"):
        vllm_weight_name(old, ARCHITECTURES["qwen3_vl"])


@pytest.mark.parametrize("name", [
    "module.model.language_model.norm.weight",  # a DDP wrapper's
    "base_model.model.model.language_model.norm.weight",  # a peft wrapper's
    "model.language_model.layers.0.self_attn.q_proj.base_layer.weight",  # LoRA not merged
    "model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight",
])
def test_wrapped_or_unmerged_names_are_refused(name):
    with pytest.raises(ValueError, match="unwrapped from DDP and with LoRA merged"):
        vllm_weight_name(name, ARCHITECTURES["qwen2_5_vl"])
    with pytest.raises(ValueError, match="no vLLM weight-name rules for LlavaForConditionalGeneration"):
        vllm_weight_name("lm_head.weight", "LlavaForConditionalGeneration")


# -- chunks and the push -----------------------------------------------------------------------------------

def test_chunks_keep_order_and_size():
    t = {k: torch.zeros(n) for k, n in {"a": 10, "b": 10, "c": 30, "d": 5, "e": 5}.items()}  # 4 bytes each
    chunks = list(chunk_weights(t.items(), max_bytes=80))
    assert [[name for name, _ in c] for c in chunks] == [["a", "b"], ["c"], ["d", "e"]]  # c (120 B) goes alone
    assert [[name for name, _ in c] for c in chunk_weights(t.items(), 10_000)] == [["a", "b", "c", "d", "e"]]
    assert list(chunk_weights([], 80)) == []
    with pytest.raises(ValueError, match="max_bytes must be > 0"):
        list(chunk_weights(t.items(), 0))


def test_a_bad_name_anywhere_stops_the_push_before_anything_loads():
    model = _tiny("qwen2_5_vl")
    target = RecordingModel(ARCHITECTURES["qwen2_5_vl"])
    weights = list(model.state_dict().items())
    weights.insert(len(weights) - 1, ("module.lm_head.weight", weights[-1][1]))
    with pytest.raises(ValueError, match="module.lm_head.weight"):
        push_weights(weights, target.load_weights, ARCHITECTURES["qwen2_5_vl"], max_bytes=1 << 12)
    assert target.calls == []


def test_a_parameter_no_chunk_loaded_is_an_error():
    model = _tiny("qwen2_5_vl")
    architecture = ARCHITECTURES["qwen2_5_vl"]
    target = RecordingModel(architecture)
    names = {vllm_weight_name(n, architecture) for n in model.state_dict()}
    weights = [(n, t) for n, t in model.state_dict().items() if "norm" not in n]
    with pytest.raises(ValueError, match="vLLM parameters received no weights"):
        push_weights(weights, target.load_weights, architecture, 1 << 12, expected=names)


def _lora_policy(tmp_path):
    from mmsearch.training.config import FreezeConfig, LoraConfig
    from mmsearch.training.model import load_policy

    _tiny("qwen2_5_vl").save_pretrained(tmp_path / "policy")
    model = load_policy(str(tmp_path / "policy"), "cpu", LoraConfig(r=4, alpha=8), FreezeConfig(vision_tower=True))
    with torch.no_grad():  # a trained adapter (B starts at zero, which would merge to nothing)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def test_the_push_sends_the_merged_lora_weights_each_once(tmp_path):
    """Trainer -> engine with LoRA: plain HF names, deltas merged in, the tied lm_head sent once (as
    embed_tokens), chunks within the bound, every tensor's values the merged ones; the model unchanged after."""
    model = _lora_policy(tmp_path)
    architecture = ARCHITECTURES["qwen2_5_vl"]
    merged = merged_lora_state(model)
    assert all(".base_layer." not in n and "lora_" not in n for n in merged)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    target = RecordingModel(architecture)
    # vLLM's tied model has no lm_head parameter of its own (it is embed_tokens)
    expected = {vllm_weight_name(n, architecture) for n in merged if n != "lm_head.weight"}
    max_bytes = 64 << 10
    with merged_weights(model) as weights:
        report = push_weights(weights, target.load_weights, architecture, max_bytes, expected=expected)
    assert isinstance(report, PushReport)
    sent = [name for call in target.calls for name, _ in call]
    assert len(sent) == len(set(sent)) == report.tensors == len(merged) - 1 and report.tied == 1
    assert set(merged) - set(sent) == {"lm_head.weight"}  # tied to embed_tokens: vLLM ties it itself
    assert report.chunks == len(target.calls) > 1 and report.loaded == expected
    for call in target.calls:
        assert len(call) == 1 or sum(4 * torch.Size(shape).numel() for _, shape in call) <= max_bytes
    for name in sent:
        torch.testing.assert_close(target.values[name], merged[name], rtol=0, atol=0, msg=name)
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    base = before["base_model.model.model.language_model.layers.0.self_attn.q_proj.base_layer.weight"]
    assert not torch.equal(target.values[q], base)  # the delta is in what was sent ...
    for name, p in model.named_parameters():  # ... and out of the model again
        torch.testing.assert_close(p.detach(), before[name], rtol=0, atol=1e-6, msg=name)


# -- config ---------------------------------------------------------------------------------------------------

def _rl(*overrides: str) -> RLConfig:
    return load_config(RLConfig, overrides=["rewards.weights={exact_match: 1.0}", "rollout.engine=vllm", *overrides])


@pytest.mark.parametrize("overrides, message", [
    ([], "set algorithm.tis_cap"),
    (["algorithm.tis_cap=2", "device=cpu"], "needs a CUDA GPU"),
    (["algorithm.old_logprobs=engine", "algorithm.tis_cap=2"], "would correct the same mismatch twice"),
    (["algorithm.tis_cap=2", "rollout.vllm.gpu_memory_utilization=1.0"], "gpu_memory_utilization must be in"),
    (["algorithm.tis_cap=2", "rollout.vllm.sleep_level=3"], "sleep_level must be 0"),
    (["algorithm.tis_cap=2", "rollout.vllm.dtype=int8"], "rollout.vllm.dtype must be one of"),
    (["algorithm.tis_cap=2", "rollout.vllm.weight_chunk_mb=0"], "weight_chunk_mb >= 1"),
    (["rollout.engine=sglang"], "RL rolls out with hf"),
])
def test_bad_vllm_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        _rl(*overrides).check()


def test_vllm_configs_that_pass():
    from mmsearch.rl import train as rl
    from mmsearch.rl.rollout import vllm_dtype

    cfg = _rl("algorithm.tis_cap=2")
    cfg.check()
    assert not rl._old_logprobs_from_update(cfg)  # a separate engine: the trainer recomputes them
    assert vllm_dtype(cfg) == "fp32" and vllm_dtype(_rl("precision=bf16")) == "bf16"
    assert vllm_dtype(_rl("precision=bf16", "rollout.vllm.dtype=fp16")) == "fp16"
    with pytest.warns(UserWarning, match="old_logprobs=engine"):
        _rl("algorithm.old_logprobs=engine").check()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _rl("algorithm.tis_cap=2", "rollout.vllm.sleep_level=0").check()


# -- Rollouts.push_weights ----------------------------------------------------------------------------------

def _crop_only(policy_dir, tmp_path, *overrides):
    """A config whose tools need no index (crop only), so Rollouts builds without one."""
    return load_config(RLConfig, overrides=[f"model={policy_dir}", f"out={tmp_path}", "device=cpu",
                                            "rewards.weights={exact_match: 1.0}", "rollout.tools.enabled=[crop]",
                                            "rollout.group_size=2", "rollout.agent.max_turns=2",
                                            "rollout.agent.max_new_tokens_per_turn=6", *overrides])


def test_hf_push_keeps_one_module_and_empties_the_turn_cache(policy_dir, tmp_path):
    from transformers import AutoProcessor

    from mmsearch.example import Example
    from mmsearch.rl.rollout import Rollouts
    from mmsearch.training.config import FreezeConfig, LoraConfig
    from mmsearch.training.model import hf_model, load_policy

    processor = AutoProcessor.from_pretrained(policy_dir)
    for lora in (LoraConfig(), LoraConfig(r=4)):
        model = load_policy(str(policy_dir), "cpu", lora, FreezeConfig(vision_tower=True))
        rollouts = Rollouts(_crop_only(policy_dir, tmp_path), model, processor)
        assert rollouts.engine.model is hf_model(model)
        trajectories, timings = rollouts.run([Example(id="q", question="Which flag is this?", images=[],
                                                      answers=["x"])], step=1, round_=0)
        assert len(trajectories) == 2 and timings.engine_calls >= 1 and model.training
        rollouts.engine.turns.rows[0] = None  # as if a run had left a cached row behind
        assert rollouts.push_weights() >= 0 and not rollouts.engine.turns.rows
        rollouts.close()


def test_vllm_rollouts_refuse_a_policy_on_the_cpu(policy_dir, tmp_path):
    """Checked before vLLM is imported, so the message is the same with or without it installed."""
    from transformers import AutoProcessor

    from mmsearch.rl.rollout import Rollouts
    from mmsearch.training.config import FreezeConfig, LoraConfig
    from mmsearch.training.model import load_policy

    cfg = _crop_only(policy_dir, tmp_path, "device=auto", "rollout.engine=vllm", "algorithm.tis_cap=2")
    cfg.check()
    model = load_policy(str(policy_dir), "cpu", LoraConfig(), FreezeConfig(vision_tower=True))
    with pytest.raises(ValueError, match="needs the policy on a CUDA GPU"):
        Rollouts(cfg, model, AutoProcessor.from_pretrained(policy_dir))


# -- on a GPU ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_two_rl_steps_with_colocated_vllm(policy_dir, gold_dataset, index_dir, tmp_path):
    """`mmsearch rl` with rollout.engine=vllm: two steps on the tiny policy, vLLM asleep between rollouts."""
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from rl_test_rewards import REWARD_OVERRIDES

    from mmsearch.rl.train import train_rl
    from mmsearch.training.metrics import read_metrics

    cfg = load_config(RLConfig, overrides=[
        f"model={policy_dir}", f"data={gold_dataset}", f"index={index_dir}", f"out={tmp_path / 'run'}",
        "device=cuda", "precision=bf16", "steps=2", "rollout.prompts_per_step=2", "rollout.group_size=2",
        "rollout.agent.max_turns=2", "rollout.agent.max_new_tokens_per_turn=12",
        "rollout.agent.max_new_tokens_per_trajectory=24", "eval.enabled=false", "guard.enabled=false",
        "optim.lr=1e-4", "rollout.engine=vllm", "algorithm.tis_cap=2", "rollout.vllm.sleep_level=1",
        "rollout.vllm.gpu_memory_utilization=0.2", "rollout.vllm.enforce_eager=true", *REWARD_OVERRIDES])
    train_rl(cfg, progress=False)
    train = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    for record in train:
        assert record["time/weight_sync"] > 0 and record["time/generate"] > 0
        assert record["response_tokens_mean"] > 0
        # the pushed weights are the trainer's: bf16 vLLM against the bf16-autocast trainer stays close
        assert 0.8 < record["mismatch/ratio_mean"] < 1.25, record["mismatch/ratio_mean"]
        assert "is_ratio_mean" in record
