"""Load the policy for training: dtype, frozen parts, LoRA, gradient checkpointing; save it back as HF."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from mmsearch.logprobs import unwrap_peft as hf_model  # the transformers model inside a peft wrapper, or itself
from mmsearch.training.config import FreezeConfig, LoraConfig


def load_policy(path: str, device: str, lora: LoraConfig, freeze: FreezeConfig,
                gradient_checkpointing: bool = False) -> nn.Module:
    """The policy in fp32 (bf16 runs under autocast), with `freeze` and `lora` applied.

    A text-only policy (a causal LM) has no vision side: `freeze` has nothing to act on there.
    """
    from mmsearch.model.policy import is_vision_language, load_model

    model = load_model(path, torch.float32).to(device)
    vision = is_vision_language(model.config)
    if lora.r > 0:
        from peft import LoraConfig, get_peft_model

        targets = "|".join(lora.target_modules)
        # only the language model's layers: the vision blocks reuse names like gate_proj
        layers = r".*language_model\.layers" if vision else r"model\.layers"
        model = get_peft_model(model, LoraConfig(  # freezes everything it does not adapt
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=rf"{layers}\.\d+\..*\.({targets})",
        ))
    # The vision side trains unless frozen, with or without LoRA on the language model.
    for name, p in hf_model(model).model.visual.named_parameters() if vision else ():
        p.requires_grad_(not (freeze.projector if name.startswith("merger.") else freeze.vision_tower))
    if gradient_checkpointing:
        base = hf_model(model)
        kwargs = {"use_reentrant": False}
        if hasattr(base, "activation_checkpointing_enable"):  # the name since transformers 5.x; the old one warns
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        base.config.use_cache = False
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def save_hf(model: nn.Module, processor, out: Path, state_dict: dict | None = None) -> None:
    """A plain Hugging Face model + processor dir; LoRA weights are merged into it (the adapter is saved beside)."""
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "get_base_model"):
        model.save_pretrained(out / "adapter")  # the LoRA adapter alone, for PEFT users
        state_dict = merged_lora_state(model)
    hf_model(model).save_pretrained(out, state_dict=state_dict)
    processor.save_pretrained(out)


@contextlib.contextmanager
def merged_weights(model: nn.Module) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The policy's weights under the plain Hugging Face names, LoRA deltas merged in, valid inside the block.

    The tensors are the model's own (no copy): with LoRA the adapters are merged into the base weights
    on entry and taken out again on exit, so anything kept past the block must be copied.
    """
    peft = hasattr(model, "get_base_model")
    if peft:
        with torch.no_grad():
            model.merge_adapter()
    try:
        yield [(name.replace(".base_layer.", "."), tensor.detach())
               for name, tensor in hf_model(model).state_dict().items() if "lora_" not in name]
    finally:
        if peft:
            with torch.no_grad():
                model.unmerge_adapter()


def merged_lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with every LoRA delta added in, under the original names."""
    with merged_weights(model) as weights:
        return {name: tensor.clone() for name, tensor in weights}
