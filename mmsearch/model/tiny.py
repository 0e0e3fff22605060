"""`mmsearch model init-tiny`: a few-million-parameter Qwen2.5-VL policy for the embedded world.

The architecture, processor and chat template are the real Qwen2.5-VL ones, only small: a
byte-level BPE tokenizer trained on the KB's text (plus the Qwen special tokens and the protocol's
tags), a 2-block vision tower with patch 14 and spatial merge 2, and a few decoder layers with
multimodal rotary positions. The saved dir loads with `AutoModelForImageTextToText` and
`AutoProcessor` like any Qwen2.5-VL checkpoint, so everything downstream treats it as one.

`text_only` (`init-tiny --text-only`, configs/model/tiny_text.yaml) writes the text-only policy
instead: the same tokenizer and chat template and the same decoder (Qwen2.5-VL's language model is
Qwen2's), as a `Qwen2ForCausalLM` with 1-D rotary positions and no vision tower. It loads with
`AutoModelForCausalLM` and `AutoTokenizer` like Qwen2.5-*-Instruct.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mmsearch.model.policy import SYSTEM_PROMPTS_KEY
from mmsearch.protocols import DEFAULT as DEFAULT_PROTOCOL

PROTOCOL_WEIGHT = 200  # how many times the protocol text counts in tokenizer training

# Qwen2.5-VL's special tokens (control tokens, never produced by BPE merges).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# The protocol's tags: single tokens so that an action's end is one token to stop on. Qwen ships
# <tool_call> and </tool_call> the same way (added, not special, so they survive decoding).
PROTOCOL_TOKENS = [
    "<tool_call>", "</tool_call>", "<think>", "</think>", "<answer>", "</answer>",
    "<tool_response>", "</tool_response>", "<tools>", "</tools>",
]

# The Qwen2.5-VL chat template, unchanged in what it renders: each image part becomes
# <|vision_start|><|image_pad|><|vision_end|>, which the processor expands to the image's tokens.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class TinyTextConfig:
    hidden_size: int = 192
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 6
    num_key_value_heads: int = 2
    # Splits head_dim/2 rotary frequencies into (temporal, height, width); must sum to head_dim/2.
    mrope_section: list[int] = field(default_factory=lambda: [4, 6, 6])
    max_position_embeddings: int = 8192
    rope_theta: float = 10000.0
    # The first `window_layers` layers attend to the last `sliding_window` tokens only (themselves
    # included; Qwen2's per-layer sliding window). A window of 2 makes every head of layer 0 mix a
    # token with the one before it, so later layers can match "the token that followed X" from the
    # first step: copying by content (induction) then forms within a few hundred steps instead of
    # not at all in the 12-minute budget (README, "Copy circuits"). 0 = full attention everywhere.
    sliding_window: int = 2
    window_layers: int = 1


@dataclass
class TinyVisionConfig:
    depth: int = 2
    hidden_size: int = 96
    intermediate_size: int = 256
    num_heads: int = 4
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    # The world's scenes (448x336) are seen at 252x168 (54 image tokens); entity images at 140x140.
    min_pixels: int = 56 * 56
    max_pixels: int = 224 * 224


@dataclass
class TinyPolicyConfig:
    kb: str = "runs/world"
    out: str = "runs/policy"
    seed: int = 0
    vocab_size: int = 1000  # small enough that copying forms over the whole vocabulary (README, "Copy circuits")
    # Questions in the data pipeline's wording, naming no entity, added to the tokenizer's text
    # (`data_pipeline.synth.templates.sample_questions`): without them the KB's names take the merges
    # and question words split into letters ("H ow  ma n y") (README, "Question words and reading rows").
    wording_questions: int = 3000
    text_only: bool = False  # a Qwen2 causal LM (tokenizer + model, for text_search alone) instead of Qwen2.5-VL
    # The system prompt the policy is trained and served with in the default protocol, qwen_tools (`agent.system_prompt`'s
    # template, recorded in its config.json); empty: the protocol's own, every tool's JSON schema.
    system_prompt: str = ""
    text: TinyTextConfig = field(default_factory=TinyTextConfig)
    vision: TinyVisionConfig = field(default_factory=TinyVisionConfig)


def _kb_texts(kb: Path, wording_questions: int = 0, system_prompt: str = "") -> Iterator[str]:
    """Everything the policy will read or write: passages, image captions, entity names and facts, the
    protocol (with the policy's system prompt), and `wording_questions` questions in the pipeline's wording
    (no entity in them)."""
    from mmsearch.protocols.qwen_tools import tool_prompt_examples

    for name in ("passages.jsonl", "images.jsonl", "entities.jsonl"):
        path = kb / name
        if not path.exists():
            continue
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the KB reader reports bad lines; the tokenizer only needs text
                if name == "entities.jsonl":
                    yield " ".join([record.get("name", ""), *record.get("aliases", [])])
                    yield " ".join(f"{k}: {v}" for k, v in record.get("facts", {}).items())
                else:
                    yield f"{record.get('title', '')}\n{record.get('text', '')}"
    # The system prompt and protocol text appear in every sample, but only once in the KB. Repeating
    # them lets BPE merge their JSON and tags into few tokens (the prompt drops from ~750 tokens to a
    # fraction of that), which is most of the prefill cost of every turn.
    protocol = list(tool_prompt_examples(system_prompt))
    for _ in range(PROTOCOL_WEIGHT):
        yield from protocol
    if wording_questions:
        from data_pipeline.synth.templates import sample_questions

        yield from sample_questions(wording_questions)


def train_tokenizer(kb: Path, vocab_size: int, wording_questions: int = 0, system_prompt: str = ""):
    """A byte-level BPE over the KB's text with Qwen's special tokens, as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_kb_texts(kb, wording_questions, system_prompt), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        model_max_length=8192, padding_side="left", clean_up_tokenization_spaces=False,
    )
    tokenizer.add_tokens(PROTOCOL_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor(tokenizer, vision: TinyVisionConfig):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    size = {"shortest_edge": vision.min_pixels, "longest_edge": vision.max_pixels}
    common = {"patch_size": vision.patch_size, "merge_size": vision.spatial_merge_size,
                  "temporal_patch_size": vision.temporal_patch_size, "size": size}
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**common),
        video_processor=Qwen2VLVideoProcessor(**common),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )


def _decoder_config(tokenizer, t: TinyTextConfig) -> dict:
    """The language model's config (Qwen2's fields), shared by the VL policy and the text-only one."""
    if t.sliding_window and not 0 < t.window_layers <= t.num_hidden_layers:
        raise ValueError(f"text.window_layers {t.window_layers} must be in 1..num_hidden_layers ({t.num_hidden_layers})")
    windowed = t.window_layers if t.sliding_window else 0
    window = {"use_sliding_window": True, "sliding_window": t.sliding_window} if windowed else {}
    ids = tokenizer.convert_tokens_to_ids
    return {
        "vocab_size": len(tokenizer), "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads, "max_position_embeddings": t.max_position_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
        "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"), "pad_token_id": ids("<|endoftext|>"),
        "layer_types": ["sliding_attention"] * windowed + ["full_attention"] * (t.num_hidden_layers - windowed),
        **window,
    }


def _generation_defaults(model, tokenizer):
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return model


def build_text_model(tokenizer, cfg: TinyPolicyConfig):
    """The text-only policy: the VL policy's decoder as a Qwen2 causal LM (1-D rotary positions, no vision)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**_decoder_config(tokenizer, cfg.text), tie_word_embeddings=True)
    torch.manual_seed(cfg.seed)
    return _generation_defaults(Qwen2ForCausalLM(config), tokenizer)


def build_model(tokenizer, cfg: TinyPolicyConfig):
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    t, v = cfg.text, cfg.vision
    head_dim = t.hidden_size // t.num_attention_heads
    if sum(t.mrope_section) * 2 != head_dim:
        raise ValueError(f"text.mrope_section {t.mrope_section} must sum to head_dim/2 = {head_dim // 2}")
    ids = tokenizer.convert_tokens_to_ids
    text = _decoder_config(tokenizer, t)
    text["rope_parameters"]["mrope_section"] = list(t.mrope_section)
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config={
            "depth": v.depth, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size, "num_heads": v.num_heads,
            "out_hidden_size": t.hidden_size, "patch_size": v.patch_size, "spatial_merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size, "window_size": v.window_size,
            "fullatt_block_indexes": [v.depth - 1],
        },
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(cfg.seed)
    return _generation_defaults(Qwen2_5_VLForConditionalGeneration(config), tokenizer)


def init_tiny(cfg: TinyPolicyConfig) -> Path:
    """Train the tokenizer, build processor (text-only: the tokenizer alone) and model, and save them as one
    Hugging Face dir."""
    kb, out = Path(cfg.kb), Path(cfg.out)
    if not (kb / "passages.jsonl").exists():
        raise FileNotFoundError(f"{kb} is not a KB dir (no passages.jsonl)")
    tokenizer = train_tokenizer(kb, cfg.vocab_size, cfg.wording_questions, cfg.system_prompt)
    if cfg.text_only:
        processor, model = tokenizer, build_text_model(tokenizer, cfg)
    else:
        processor, model = build_processor(tokenizer, cfg.vision), build_model(tokenizer, cfg)
    if cfg.system_prompt:
        setattr(model.config, SYSTEM_PROMPTS_KEY, {DEFAULT_PROTOCOL: cfg.system_prompt})
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
