"""What a policy checkpoint is: vision-language (processor + model) or text-only (tokenizer + model).

DESIGN.md "Policies": both kinds go through the same trajectory builder, engines, SFT and RL. They
load here, and a text-only policy's tokenizer is wrapped in `TextProcessor`, which gives it the
processor's interface (chat template, tokenizing a delta, saving), so everything downstream holds
"a processor" and branches only where images genuinely differ (`is_text_only`, `is_vision_language`).
"""

from __future__ import annotations

import json
from typing import Any

# The tools that take an image or return one: a text-only policy can use neither.
IMAGE_TOOLS = ("image_search", "crop")


class TextOnlyError(ValueError):
    """An image reached a text-only policy."""


def images_refused(n_images: int) -> TextOnlyError:
    return TextOnlyError(
        f"this policy is text-only (a causal LM with a tokenizer, no image processor) and cannot read images, but "
        f"the conversation has {n_images} image(s): ask without an image, load only imageless examples, or use a "
        "vision-language policy")


def is_vision_language(config) -> bool:
    """A Qwen2-VL / Qwen2.5-VL / Qwen3-VL (or any other image-text) config: it has a vision tower."""
    return getattr(config, "vision_config", None) is not None


def model_class(config):
    """The Auto class that builds this config's model: image-text-to-text, or a plain causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if is_vision_language(config) else AutoModelForCausalLM


def load_model(path: str, dtype):
    """The policy's weights from a model dir or hub name, as the Auto class its config calls for."""
    from transformers import AutoConfig

    return model_class(AutoConfig.from_pretrained(path)).from_pretrained(path, dtype=dtype)


def reads_images(path: str) -> bool:
    """Whether the checkpoint at `path` is vision-language, from its config alone (no weights load).

    A path whose config cannot be read counts as vision-language: whatever loads it next reports why.
    """
    from transformers import AutoConfig

    try:
        return is_vision_language(AutoConfig.from_pretrained(path))
    except (OSError, ValueError):
        return True


# The config key under which a policy records the system prompts it was trained with, by protocol
# ({"qwen_tools": template}; `agent.system_prompt`'s template form). It travels in config.json through every
# checkpoint SFT and RL save, so eval, ask, RL and the app serve the policy the prompt it knows unasked.
SYSTEM_PROMPTS_KEY = "mmsearch_system_prompts"


def recorded_system_prompt(source, protocol: str) -> str:
    """The system prompt a policy records for `protocol` (a model, its config, or a local model dir), or "".

    Hub names and paths without a config.json record nothing: released checkpoints take the protocol's prompt.
    """
    from pathlib import Path

    if isinstance(source, (str, Path)):
        config = Path(source, "config.json")
        prompts = json.loads(config.read_text(encoding="utf-8")).get(SYSTEM_PROMPTS_KEY) if config.is_file() else None
    else:
        prompts = getattr(getattr(source, "config", source), SYSTEM_PROMPTS_KEY, None)
    return (prompts or {}).get(protocol, "")


def load_processor(path: str):
    """The policy's processor: a VL checkpoint's own, or its tokenizer as a `TextProcessor`."""
    from transformers import AutoProcessor

    return as_processor(AutoProcessor.from_pretrained(path))  # a dir without an image processor gives its tokenizer


def as_processor(processor_or_tokenizer):
    """A processor as it is; a bare tokenizer wrapped in `TextProcessor`."""
    from transformers import PreTrainedTokenizerBase

    if isinstance(processor_or_tokenizer, PreTrainedTokenizerBase):
        return TextProcessor(processor_or_tokenizer)
    return processor_or_tokenizer


def is_text_only(processor) -> bool:
    return getattr(processor, "image_processor", None) is None


class TextProcessor:
    """A tokenizer with the processor interface the trajectory builder, engines and checkpoints use.

    Its chat template gets every message's content as one string: text-only templates (Qwen2.5,
    Qwen3, Llama) concatenate `message.content` and cannot read a list of parts. Deltas are tokenized
    without special tokens: the chat template writes every special token itself (a BOS-adding tokenizer
    would otherwise put one before every delta). An image anywhere is a `TextOnlyError`.
    """

    image_processor = None

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @property
    def chat_template(self) -> str | None:
        return self.tokenizer.chat_template

    def apply_chat_template(self, conversation: list[dict], **kwargs) -> Any:
        return self.tokenizer.apply_chat_template([_text_message(m) for m in conversation], **kwargs)

    def __call__(self, text: list[str] | str, images=None, return_tensors: str | None = None, **kwargs):
        if images:
            raise images_refused(len(images))
        return self.tokenizer(text, add_special_tokens=False, return_tensors=return_tensors, **kwargs)

    def save_pretrained(self, path, **kwargs):
        return self.tokenizer.save_pretrained(path, **kwargs)


def _text_message(message: dict) -> dict:
    content = message.get("content")
    if not isinstance(content, list):
        return message
    images = sum(1 for part in content if part.get("type") != "text")
    if images:
        raise images_refused(images)
    return {**message, "content": "".join(part["text"] for part in content)}
