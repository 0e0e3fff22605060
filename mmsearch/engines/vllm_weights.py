"""Pushing the trainer's weights into a colocated vLLM engine: names, chunks, and the checks around them.

vLLM's `Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration` and
`Qwen3VLForConditionalGeneration` take Hugging Face checkpoint names in `load_weights(weights)`: they
rename them with the class's `hf_to_vllm_mapper` (a `WeightsMapper` whose `orig_to_new_prefix` rules
apply in order, each to the result of the one before: `WeightsMapper._map_name` in
vllm/model_executor/models/utils.py) and `AutoWeightsLoader` then places each tensor, stacking q/k/v
and gate/up into vLLM's fused `qkv_proj` / `gate_up_proj` as it goes. So the trainer sends its own
state-dict names, and this module adds what vLLM does not:

* `vllm_weight_name` applies the same prefix rules, so a name vLLM cannot place (a DDP `module.`, an
  unmerged LoRA `base_layer`) is refused before any tensor is loaded. vLLM raises at the first unknown
  name, after loading the ones before it, which would leave a half-updated engine.
* `chunk_weights` groups tensors into `load_weights` calls of bounded size.
* `push_weights` sends tied tensors once (Qwen2.5-VL-3B's `lm_head` is its `embed_tokens`; vLLM ties
  them itself), loads chunk by chunk, and checks that every vLLM parameter received a value. This is the
  check vLLM's own loader makes at start-up, and it matters after a level-2 sleep, which discards the weights.

Nothing here imports vLLM; the tests drive `push_weights` with a recording `load_weights` stand-in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

# vLLM's hf_to_vllm_mapper.orig_to_new_prefix per architecture (vllm/model_executor/models/qwen2_vl.py,
# qwen2_5_vl.py, qwen3_vl.py). The first rules rename the layout of transformers >= 4.52 (5.x included):
# model.language_model.*, model.visual.*, lm_head.*. Qwen2-VL's last rule covers older checkpoints'
# top-level model.* (their visual.* is already vLLM's name).
_QWEN2_VL = {"model.language_model.": "language_model.model.", "model.visual.": "visual.",
             "lm_head.": "language_model.lm_head.", "model.": "language_model.model."}
VLLM_PREFIX_RULES: dict[str, dict[str, str]] = {
    "Qwen2VLForConditionalGeneration": _QWEN2_VL,
    "Qwen2_5_VLForConditionalGeneration": _QWEN2_VL,
    "Qwen3VLForConditionalGeneration": {"model.visual.": "visual.", "lm_head.": "language_model.lm_head.",
                                        "model.language_model.": "language_model.model."},
}
# The submodules of those vLLM classes that weights load into.
VLLM_MODULES = ("visual.", "language_model.model.", "language_model.lm_head.")


def vllm_weight_name(name: str, architecture: str) -> str:
    """The parameter name vLLM's `load_weights` turns Hugging Face name `name` into; ValueError if none."""
    rules = VLLM_PREFIX_RULES.get(architecture)
    if rules is None:
        raise ValueError(f"no vLLM weight-name rules for {architecture}; known: {', '.join(VLLM_PREFIX_RULES)}")
    mapped = name
    for prefix, new in rules.items():
        if mapped.startswith(prefix):
            mapped = new + mapped[len(prefix):]
    if not mapped.startswith(VLLM_MODULES) or ".base_layer." in mapped or "lora_" in mapped:
        raise ValueError(
            f"weight {name!r} has no place in vLLM's {architecture}: send the trained model's own state-dict "
            "names, unwrapped from DDP and with LoRA merged (mmsearch.training.model.merged_weights)"
        )
    return mapped


def chunk_weights(weights: Iterable[tuple[str, torch.Tensor]], max_bytes: int
                  ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of `weights` of at most `max_bytes` each (a larger tensor goes alone), in order."""
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
    chunk: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in weights:
        nbytes = tensor.numel() * tensor.element_size()
        if chunk and size + nbytes > max_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append((name, tensor))
        size += nbytes
    if chunk:
        yield chunk


def _storage_key(tensor: torch.Tensor) -> tuple | None:
    """Identifies the memory a tensor views (tied weights share it); None where there is none to compare."""
    if tensor.numel() == 0 or tensor.device.type == "meta":
        return None
    pointer = tensor.untyped_storage().data_ptr()
    if pointer == 0:
        return None
    return pointer, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype


@dataclass
class PushReport:
    tensors: int = 0  # sent (a tied weight once)
    tied: int = 0  # names skipped because their tensor was already sent under another name
    bytes: int = 0
    chunks: int = 0
    loaded: set[str] = field(default_factory=set)  # vLLM parameter names the engine reported loading


Chunk = list[tuple[str, torch.Tensor]]


def push_weights(weights: Iterable[tuple[str, torch.Tensor]], load: Callable[[Chunk], Iterable[str] | None],
                 architecture: str, max_bytes: int, expected: set[str] | None = None) -> PushReport:
    """Send `weights` (Hugging Face names) through `load`, one call per chunk of at most `max_bytes`.

    `load(chunk)` applies one chunk (in vLLM: `model.load_weights(chunk)` in every worker) and returns the
    vLLM parameter names it loaded. Every name is checked before the first call; with `expected` (the
    engine's parameter names), a parameter no chunk loaded is an error.
    """
    report = PushReport()
    distinct: list[tuple[str, torch.Tensor]] = []
    seen: set[tuple] = set()
    for name, tensor in weights:
        vllm_weight_name(name, architecture)
        key = _storage_key(tensor)
        if key is not None and key in seen:
            report.tied += 1
            continue
        if key is not None:
            seen.add(key)
        distinct.append((name, tensor))
    for chunk in chunk_weights(distinct, max_bytes):
        report.loaded |= set(load(chunk) or ())
        report.chunks += 1
        report.tensors += len(chunk)
        report.bytes += sum(t.numel() * t.element_size() for _, t in chunk)
    if expected is not None:
        missing = sorted(expected - report.loaded)
        if missing:
            raise ValueError(f"{len(missing)} vLLM parameters received no weights (e.g. {missing[:3]}): the "
                             "engine would generate with stale or, after a level-2 sleep, uninitialised values")
    return report
