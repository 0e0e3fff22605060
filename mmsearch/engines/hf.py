"""`hf` engine: batched `transformers` generation for any Qwen2-VL / Qwen2.5-VL / Qwen3-VL dir.

Requests are left-padded into one batch. Multimodal rotary positions are computed by the model
over each whole sequence (every image included) because we pass `mm_token_type_ids`; without it
transformers silently falls back to 1-D positions for image tokens.
"""

from __future__ import annotations

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mmsearch.engines.base import GenerationOutput, GenerationRequest, SamplingParams


def mm_token_type_ids(input_ids: torch.Tensor, image_token_id: int, video_token_id: int | None = None) -> torch.Tensor:
    """1 on image placeholder tokens, 2 on video ones, 0 elsewhere: what the model needs for 3-D positions."""
    types = (input_ids == image_token_id).int()
    if video_token_id is not None:
        types = types + 2 * (input_ids == video_token_id).int()
    return types


MIN_SHARED_PREFIX = 32  # shorter shared prefixes are not worth a separate forward pass


class _RecordLogprobs(LogitsProcessor):
    """Keeps log p(sampled token) per step, then applies the sampling warpers itself.

    It sees the raw logits (it is the only processor generate() runs), records the
    temperature-scaled log-softmax, and when the next step arrives reads off the token that was
    sampled from it, so only one (batch, vocab) distribution is held at a time.
    """

    def __init__(self, params: SamplingParams):
        self.temperature = params.temperature if params.temperature > 0 else 1.0
        self.warpers = LogitsProcessorList()
        if params.temperature > 0:
            self.warpers.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                self.warpers.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(params.top_p))
        self.suppress = list(params.suppress_token_ids)
        self.previous: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.previous is not None:
            self._take(input_ids[:, -1])
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        if self.suppress:
            scores = scores.clone()
            scores[:, self.suppress] = -float("inf")
        return self.warpers(input_ids, scores)

    def _take(self, tokens: torch.Tensor) -> None:
        self.steps.append(self.previous.gather(1, tokens[:, None]).squeeze(1))

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        """(batch, steps) log-probs, given the tokens sampled at the final step."""
        self._take(last_tokens)
        return torch.stack(self.steps, dim=1).cpu()


class HFEngine:
    token_level = True

    def __init__(self, model, processor, max_batch: int = 64):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_batch = max_batch
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        config = model.config
        self.image_token_id = config.image_token_id
        self.video_token_id = getattr(config, "video_token_id", None)
        self.vision_start_id = getattr(config, "vision_start_token_id", None)

    @classmethod
    def from_pretrained(cls, path: str, device: str = "auto", dtype: str = "auto", max_batch: int = 64) -> HFEngine:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from tools.device import resolve_device

        device = resolve_device(device)
        torch_dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
                       "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype).to(device)
        return cls(model, AutoProcessor.from_pretrained(path), max_batch=max_batch)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def generate(self, requests: list[GenerationRequest], params: SamplingParams,
                 stop_token_ids: list[int]) -> list[GenerationOutput]:
        outputs: list[GenerationOutput] = []
        for start in range(0, len(requests), self.max_batch):
            outputs += self._generate_batch(requests[start:start + self.max_batch], params, stop_token_ids)
        return outputs

    @torch.inference_mode()
    def _generate_batch(self, requests: list[GenerationRequest], params: SamplingParams,
                        stop_token_ids: list[int]) -> list[GenerationOutput]:
        prefix = self.shared_prefix_len(requests)
        inputs = self.batch_inputs(requests, prefix)
        extra = {"past_key_values": self._prefix_cache(inputs["input_ids"][:1, :prefix], len(requests))} if prefix else {}
        if hasattr(self.model.model, "rope_deltas"):
            self.model.model.rope_deltas = None  # Qwen-VL caches multimodal position offsets between calls
        limits = [min(r.max_new_tokens or params.max_new_tokens, params.max_new_tokens) for r in requests]
        recorder = _RecordLogprobs(params)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        # generate() fills every unset field from the checkpoint's generation_config (Qwen ships top_k=1,
        # repetition_penalty=1.05, ...), which would run outside our recorder; so all of them are set
        # neutral here, and the recorder applies temperature/top-k/top-p after recording the log-probs.
        sampling = params.temperature > 0
        config = GenerationConfig(
            max_new_tokens=max(limits), do_sample=sampling, repetition_penalty=1.0,
            **({"temperature": 1.0, "top_p": 1.0, "top_k": 0} if sampling else {}),
            eos_token_id=list(stop_token_ids), pad_token_id=self.pad_id, return_dict_in_generate=True,
        )
        out = self.model.generate(**inputs, **extra, generation_config=config,
                                  logits_processor=LogitsProcessorList([recorder]))
        generated = out.sequences[:, inputs["input_ids"].shape[1]:]
        logprobs = recorder.finish(generated[:, -1])
        stops = set(stop_token_ids)
        results = []
        for row, limit in enumerate(limits):
            ids = generated[row].tolist()
            end = next((i + 1 for i, t in enumerate(ids) if t in stops), None)
            if end is not None and end <= limit:
                results.append(GenerationOutput(ids[:end], logprobs[row, :end].tolist(), "stop"))
            else:
                results.append(GenerationOutput(ids[:limit], logprobs[row, :limit].tolist(), "length"))
        return results

    def shared_prefix_len(self, requests: list[GenerationRequest]) -> int:
        """Length of the text prefix every request shares (the system prompt), if worth caching.

        It stops before the first image, so every image's tokens and pixels stay in the part the
        model encodes in this call. Below MIN_SHARED_PREFIX tokens, or for one request, sharing
        saves nothing.
        """
        if len(requests) < 2:
            return 0
        first = requests[0].token_ids
        n = min(len(r.token_ids) for r in requests) - 1  # at least one token of each request is encoded now
        for r in requests[1:]:
            n = next((i for i, (a, b) in enumerate(zip(first[:n], r.token_ids[:n])) if a != b), n)
        vision = {self.image_token_id, self.video_token_id, self.vision_start_id}
        n = next((i for i, t in enumerate(first[:n]) if t in vision), n)
        return n if n >= MIN_SHARED_PREFIX else 0

    def _prefix_cache(self, prefix_ids: torch.Tensor, batch: int):
        """The shared prefix's KV cache, computed once and repeated for every row of the batch."""
        out = self.model(input_ids=prefix_ids, attention_mask=torch.ones_like(prefix_ids), use_cache=True)
        cache = out.past_key_values
        cache.batch_repeat_interleave(batch)
        return cache

    def batch_inputs(self, requests: list[GenerationRequest], prefix: int = 0) -> dict[str, torch.Tensor]:
        """Padded ids, attention mask, modality types, and every request's images in order.

        Rows are left-padded; with a shared `prefix`, the padding goes right after it instead, so the
        prefix sits at the same positions in every row and one KV cache serves them all. The mask
        hides the gap, and positions (1-D and multimodal) are counted over unmasked tokens only.
        """
        longest = prefix + max(len(r.token_ids) - prefix for r in requests)
        ids = torch.full((len(requests), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), longest), dtype=torch.long)
        for row, r in enumerate(requests):
            rest = len(r.token_ids) - prefix
            ids[row, :prefix] = torch.tensor(r.token_ids[:prefix], dtype=torch.long)
            ids[row, longest - rest:] = torch.tensor(r.token_ids[prefix:], dtype=torch.long)
            mask[row, :prefix] = 1
            mask[row, longest - rest:] = 1
        inputs = {"input_ids": ids, "attention_mask": mask,
                  "mm_token_type_ids": mm_token_type_ids(ids, self.image_token_id, self.video_token_id)}
        pixels = [r.pixel_values for r in requests if r.pixel_values is not None]
        if pixels:
            inputs["pixel_values"] = torch.cat(pixels).to(self.model.dtype)
            inputs["image_grid_thw"] = torch.cat([r.image_grid_thw for r in requests if r.image_grid_thw is not None])
        return {k: v.to(self.device) for k, v in inputs.items()}
