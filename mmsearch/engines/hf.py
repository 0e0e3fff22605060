"""`hf` engine: batched `transformers` generation for any Qwen2-VL / Qwen2.5-VL / Qwen3-VL dir, or a
text-only causal LM (no images, 1-D positions).

Requests are left-padded into one batch. Multimodal rotary positions are computed over each whole
sequence (every image included) from `mm_token_type_ids`; without them transformers silently
falls back to 1-D positions for image tokens.

Two paths, the same tokens and log-probs:
- turn cache (default): the engine keeps its rows' KV cache between calls (`turn_cache`), so a
  request that continues a trajectory it generated for encodes only the new tokens, and the G
  samples of a prompt share one prefill of that prompt. Its own prefill + decode loop samples as
  generate() does: the same warpers, the same random draws, the same recorded log-probs.
- `cache_turns=False`: transformers' generate() over each whole context, every call (the reference).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import (
    DynamicCache,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mmsearch.engines.base import GenerationOutput, GenerationRequest, SamplingParams
from mmsearch.engines.turn_cache import CachedBatch, CachedRow, KVBuffer, TurnCache, gather_rows, own_column_masks
from mmsearch.model.policy import as_processor, is_vision_language


@functools.cache
def _cache_kwarg(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_kwarg(model) -> str:
    """The name `model.forward` takes the KV cache under (and returns it as): transformers 5.x renamed
    `past_key_values` to `cache` (the old name warns). Looked up once per model class."""
    return _cache_kwarg(type(model))


def mm_token_type_ids(input_ids: torch.Tensor, image_token_id: int, video_token_id: int | None = None) -> torch.Tensor:
    """1 on image placeholder tokens, 2 on video ones, 0 elsewhere: what the model needs for 3-D positions."""
    types = (input_ids == image_token_id).int()
    if video_token_id is not None:
        types = types + 2 * (input_ids == video_token_id).int()
    return types


MIN_SHARED_PREFIX = 32  # shorter shared prefixes are not worth a separate forward pass


class TokenScores:
    """What one step's logits become: the log-probs we record, and the scores we sample from.

    Recorded: the log-softmax at the sampling temperature, before suppression and top-k/top-p
    (what the trainer recomputes). Sampled: suppressed tokens at -inf, then transformers' own
    temperature, top-k and top-p warpers. Greedy records temperature-1 log-probs.
    """

    def __init__(self, params: SamplingParams):
        self.sample = params.temperature > 0
        self.temperature = params.temperature if self.sample else 1.0
        self.warpers = LogitsProcessorList()
        if self.sample:
            self.warpers.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                self.warpers.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(params.top_p))
        self.suppress = list(params.suppress_token_ids)

    def logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits.float() / self.temperature, dim=-1)

    def warp(self, logits: torch.Tensor) -> torch.Tensor:
        if self.suppress:
            logits = logits.clone()
            logits[:, self.suppress] = -float("inf")
        return self.warpers(None, logits)

    def choose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, their log-probs) for a (batch, vocab) float32 step, drawn exactly as generate() draws them."""
        scores = self.warp(logits)
        tokens = torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(1) if self.sample else scores.argmax(-1)
        return tokens, self.logprobs(logits).gather(1, tokens[:, None]).squeeze(1)


class _RecordLogprobs(LogitsProcessor):
    """Inside generate(): keeps log p(sampled token) per step, then applies the sampling warpers itself.

    It sees the raw logits (it is the only processor generate() runs), records the
    temperature-scaled log-softmax, and when the next step arrives reads off the token that was
    sampled from it, so only one (batch, vocab) distribution is held at a time.
    """

    def __init__(self, params: SamplingParams):
        self.scores = TokenScores(params)
        self.previous: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.previous is not None:
            self._take(input_ids[:, -1])
        self.previous = self.scores.logprobs(scores)
        return self.scores.warp(scores)

    def _take(self, tokens: torch.Tensor) -> None:
        self.steps.append(self.previous.gather(1, tokens[:, None]).squeeze(1))

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        """(batch, steps) log-probs, given the tokens sampled at the final step."""
        self._take(last_tokens)
        return torch.stack(self.steps, dim=1).cpu()


@dataclass
class _Prefilled:
    """A batch ready to decode: its KV cache, which columns each row owns, the logits of its next token,
    and the rotary position that token takes when fed."""

    cache: DynamicCache | None
    mask: torch.Tensor  # (rows, columns) 0/1, the cache's columns and any being fed
    next_position: torch.Tensor  # (rows,)
    logits: torch.Tensor | None = None  # (rows, vocab) float32

    def select(self, index: torch.Tensor) -> None:
        self.cache.batch_select_indices(index)
        self.mask, self.next_position = self.mask[index], self.next_position[index]
        self.logits = None if self.logits is None else self.logits[index]


class StopStrings:
    """Where a row's generated text first completes a stop string (an inline protocol's `</search>`).

    Checked on the decoded tail of the newest tokens: every token decodes to at least one character,
    so a string of n characters lies within the last n + 1 tokens of the step that completed it. A
    row stops at the first such step, so any match in its tail was completed by its newest token.
    """

    def __init__(self, tokenizer, strings: list[str]):
        self.tokenizer, self.strings = tokenizer, list(strings)
        self.window = max(len(s) for s in self.strings) + 1

    @classmethod
    def of(cls, tokenizer, params: SamplingParams) -> StopStrings | None:
        return cls(tokenizer, params.stop_strings) if params.stop_strings else None

    def completes(self, ids: list[int]) -> bool:
        tail = self.tokenizer.decode(ids[-self.window:], skip_special_tokens=False)
        return any(s in tail for s in self.strings)

    def first_end(self, ids: list[int]) -> int | None:
        """The length of the shortest prefix of `ids` whose text completes a stop string."""
        return next((i for i in range(1, len(ids) + 1) if self.completes(ids[:i])), None)

    def step(self, texts: list[list[int]], tokens: list[int], done: torch.Tensor) -> torch.Tensor:
        """Append each still-running row's new token to its text; the rows a stop string just ended."""
        hit = torch.zeros_like(done)
        for row, (token, finished) in enumerate(zip(tokens, done.tolist())):
            if not finished:
                texts[row].append(token)
                hit[row] = self.completes(texts[row])
        return hit


class HFEngine:
    """Generation with a transformers model; with `cache_turns`, KV caches kept across turns.

    The cache holds activations of the current weights: the agent loop resets it at the start
    and end of every run, and anyone who changes the weights mid-trajectory calls `reset()`.
    """

    token_level = True

    def __init__(self, model, processor, max_batch: int = 64, cache_turns: bool = True):
        self.model = model.eval()
        self.processor = as_processor(processor)  # a text-only policy's tokenizer gets the processor interface
        self.tokenizer = self.processor.tokenizer
        self.max_batch = max_batch
        self.cache_turns = cache_turns
        self.turns = TurnCache()
        self.cache_arg = cache_kwarg(model)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        config = model.config
        # A text-only causal LM: no modality types, no pixels, 1-D rotary positions.
        self.multimodal = is_vision_language(config)
        self.image_token_id = getattr(config, "image_token_id", None)
        self.video_token_id = getattr(config, "video_token_id", None)
        self.vision_start_id = getattr(config, "vision_start_token_id", None)
        # Layers with a sliding window need masks counted in a row's own tokens (its columns have gaps).
        text = config.get_text_config()
        kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
        self.windows = ({kind: text.sliding_window if kind == "sliding_attention" else None for kind in kinds}
                        if "sliding_attention" in kinds else None)
        self.eager_masks = text._attn_implementation == "eager"  # additive float masks instead of booleans

    @classmethod
    def from_pretrained(cls, path: str, device: str = "auto", dtype: str = "auto", max_batch: int = 64,
                        cache_turns: bool = True) -> HFEngine:
        from mmsearch.model.policy import load_model, load_processor
        from tools.device import resolve_device

        device = resolve_device(device)
        torch_dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
                       "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
        model = load_model(path, torch_dtype).to(device)
        return cls(model, load_processor(path), max_batch=max_batch, cache_turns=cache_turns)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset(self) -> None:
        """Forget every cached row (their memory goes with them)."""
        self.turns.reset()

    def generate(self, requests: list[GenerationRequest], params: SamplingParams,
                 stop_token_ids: list[int]) -> list[GenerationOutput]:
        self.model.eval()  # a trainer sharing the module may have switched it back to train mode (dropout)
        chunks = [requests[start:start + self.max_batch] for start in range(0, len(requests), self.max_batch)]
        if not self.cache_turns:
            return [out for chunk in chunks for out in self._generate_batch(chunk, params, stop_token_ids)]
        outputs: list[GenerationOutput] = []
        rows: list[CachedRow] = []
        for chunk in chunks:
            chunk_outputs, chunk_rows = self._generate_cached(chunk, params, stop_token_ids)
            outputs += chunk_outputs
            rows += chunk_rows
        self.turns.keep(rows)
        return outputs

    # -- the reference path: generate() over whole contexts --------------------------------------

    @torch.inference_mode()
    def _generate_batch(self, requests: list[GenerationRequest], params: SamplingParams,
                        stop_token_ids: list[int]) -> list[GenerationOutput]:
        prefix = self.shared_prefix_len(requests)
        inputs = self.batch_inputs(requests, prefix)
        extra = {"past_key_values": self._prefix_cache(inputs["input_ids"][:1, :prefix], len(requests))} if prefix else {}
        if hasattr(self.model.model, "rope_deltas"):
            self.model.model.rope_deltas = None  # Qwen-VL caches multimodal position offsets between calls
        limits = self._limits(requests, params)
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
        return self._cut(generated, recorder.finish(generated[:, -1]), limits, stop_token_ids,
                         StopStrings.of(self.tokenizer, params))

    @staticmethod
    def _limits(requests: list[GenerationRequest], params: SamplingParams) -> list[int]:
        return [min(r.max_new_tokens or params.max_new_tokens, params.max_new_tokens) for r in requests]

    @staticmethod
    def _cut(generated: torch.Tensor, logprobs: torch.Tensor, limits: list[int],
             stop_token_ids: list[int], stop_strings: StopStrings | None = None) -> list[GenerationOutput]:
        """Each row up to its first stop token or stop string, or to its own token limit."""
        stops = set(stop_token_ids)
        results = []
        for row, limit in enumerate(limits):
            ids = generated[row].tolist()
            end = next((i + 1 for i, t in enumerate(ids) if t in stops), None)
            if stop_strings is not None:
                at = stop_strings.first_end(ids[:end])
                end = at if at is not None else end
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

    def _prefix_cache(self, prefix_ids: torch.Tensor, batch: int, cache: DynamicCache | None = None):
        """The shared prefix's KV cache (in `cache` if given), computed once and repeated for every row of the batch."""
        out = self.model(input_ids=prefix_ids, attention_mask=torch.ones_like(prefix_ids), use_cache=True,
                         **({self.cache_arg: cache} if cache is not None else {}))
        cache = getattr(out, self.cache_arg)
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
        inputs = {"input_ids": ids, "attention_mask": mask}
        if self.multimodal:
            inputs["mm_token_type_ids"] = mm_token_type_ids(ids, self.image_token_id, self.video_token_id)
        pixels = [r.pixel_values for r in requests if r.pixel_values is not None]
        if pixels:
            inputs["pixel_values"] = torch.cat(pixels).to(self.model.dtype)
            inputs["image_grid_thw"] = torch.cat([r.image_grid_thw for r in requests if r.image_grid_thw is not None])
        return {k: v.to(self.device) for k, v in inputs.items()}

    # -- the turn-cache path: our own prefill and decode over cached rows ------------------------

    @torch.inference_mode()
    def _generate_cached(self, requests: list[GenerationRequest], params: SamplingParams,
                         stop_token_ids: list[int]) -> tuple[list[GenerationOutput], list[CachedRow]]:
        limits = self._limits(requests, params)
        state = self._prefill(requests, room=max(limits))
        start = state.next_position
        tokens, logprobs, placement = self._decode(state, params, stop_token_ids, limits)
        outputs = self._cut(tokens, logprobs.cpu(), limits, stop_token_ids, StopStrings.of(self.tokenizer, params))
        return outputs, self._rows_after(requests, outputs, start, placement)

    def _prefill(self, requests: list[GenerationRequest], room: int) -> _Prefilled:
        """Continue the cached rows when every request continues one; otherwise encode the prompts afresh.
        The cache is allocated once, with `room` columns to spare for the tokens decoding will feed."""
        rows = [self.turns.take(r) for r in requests]
        return self._prefill_rows(requests, rows, room) if all(rows) else self._prefill_prompts(requests, room)

    def _prefill_prompts(self, requests: list[GenerationRequest], room: int) -> _Prefilled:
        """Encode each distinct prompt once (the G samples of an example share one), then give every
        request its prompt's cache row. Distinct prompts still share their common text prefix."""
        group, prompts = _prompt_groups(requests)
        prefix = self.shared_prefix_len(prompts)
        inputs = self.batch_inputs(prompts, prefix)
        positions = self._positions(inputs)
        cache = KVBuffer(inputs["input_ids"].shape[1] + room)
        if prefix:
            cache = self._prefix_cache(inputs["input_ids"][:1, :prefix], len(prompts), cache)
        state = _Prefilled(cache, inputs["attention_mask"], positions.amax(dim=(0, 2)) + 1)
        state.logits = self._forward(state, inputs["input_ids"][:, prefix:], positions[:, :, prefix:], inputs)
        if len(prompts) < len(requests):
            state.select(torch.tensor(group, device=self.device))
        return state

    def _prefill_rows(self, requests: list[GenerationRequest], rows: list[CachedRow], room: int) -> _Prefilled:
        """Encode only what each cached row lacks; its positions continue from the row's own."""
        inputs = self.batch_inputs([row.delta(r) for r, row in zip(requests, rows)])
        cache, mask = gather_rows([(row.batch, row.index) for row in rows], room=inputs["input_ids"].shape[1] + room)
        start = torch.tensor([row.next_position for row in rows], device=self.device)
        positions = self._positions(inputs) + start[None, :, None]
        state = _Prefilled(cache, torch.cat([mask, inputs["attention_mask"]], dim=1), positions.amax(dim=(0, 2)) + 1)
        state.logits = self._forward(state, inputs["input_ids"], positions, inputs)
        return state

    def _positions(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(3, rows, columns) multimodal rotary positions of each row's unmasked tokens, counted from 0.

        A text-only model's 1-D positions come in the same shape (three equal rows; `_forward` passes it one).
        """
        if not self.multimodal:
            return (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)[None].expand(3, -1, -1)
        positions, _ = self.model.model.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"), attention_mask=inputs["attention_mask"])
        return positions

    def _forward(self, state: _Prefilled, input_ids: torch.Tensor, positions: torch.Tensor,
                 images: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Feed `input_ids` after the cached columns; the last column's next-token logits (float32)."""
        pixels = {k: images[k] for k in ("pixel_values", "image_grid_thw") if images and k in images}
        mask = state.mask
        if self.windows:
            mask = own_column_masks(state.mask, input_ids.shape[1], self.windows, self.eager_masks, self.model.dtype)
        positions = positions if self.multimodal else positions[0]
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                         use_cache=True, logits_to_keep=1, **{self.cache_arg: state.cache}, **pixels)
        state.cache = getattr(out, self.cache_arg)
        return out.logits[:, -1].float()

    def _decode(self, state: _Prefilled, params: SamplingParams, stop_token_ids: list[int],
                limits: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[tuple[CachedBatch, int]]]:
        """(rows, steps) tokens and log-probs, sampled until every row stopped or reached its limit, and
        where each row's cache ended up: (batch, row in it).

        A row that is done leaves the batch at once: its cache row (every token but its last, which
        was sampled and never fed) is set aside as a batch of its own, and the forward passes go on
        with the rows still decoding. Every row is still sampled at every step (a done row from its
        last logits; what it draws is cut off), so the random draws are generate()'s: torch draws a
        row's sample from that row's own slice of one noise tensor over the whole batch.
        """
        scores, steps = TokenScores(params), max(limits)
        stops = torch.tensor(stop_token_ids, device=self.device)
        stop_strings = StopStrings.of(self.tokenizer, params)
        texts: list[list[int]] = [[] for _ in limits]  # each row's tokens, read only for stop strings
        limit = torch.tensor(limits, device=self.device)
        done = torch.zeros(len(limits), dtype=torch.bool, device=self.device)
        active = torch.arange(len(limits), device=self.device)  # the request each row of `state` decodes
        placement: list[tuple[CachedBatch, int] | None] = [None] * len(limits)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        tokens, logprobs = [], []
        logits = state.logits
        for step in range(steps):
            token, logprob = scores.choose(logits)
            tokens.append(token)
            logprobs.append(logprob)
            done |= torch.isin(token, stops) | (limit <= step + 1)
            if stop_strings is not None:
                done |= stop_strings.step(texts, token.tolist(), done)
            if step + 1 == steps or bool(done.all()):
                break
            finished = done[active]
            if bool(finished.any()):
                leaving = finished.nonzero().squeeze(1)
                aside = CachedBatch.of(state.cache, state.mask, leaving)
                for i, row in enumerate(active[leaving].tolist()):
                    placement[row] = (aside, i)
                staying = (~finished).nonzero().squeeze(1)
                state.select(staying)
                active = active[staying]
            state.mask = F.pad(state.mask, (0, 1), value=1)
            position = (state.next_position + step)[None, :, None].expand(3, -1, 1)
            fed = self._forward(state, token[active, None], position)
            if len(active) == len(limits):
                logits = fed
            else:
                logits = logits.clone()
                logits[active] = fed
        last = CachedBatch.of(state.cache, state.mask)
        for i, row in enumerate(active.tolist()):
            placement[row] = (last, i)
        return torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1), placement

    def _rows_after(self, requests: list[GenerationRequest], outputs: list[GenerationOutput], start: torch.Tensor,
                    placement: list[tuple[CachedBatch, int]]) -> list[CachedRow]:
        """The rows to keep: each holds its request and its output but the output's last token."""
        return [CachedRow(r.trajectory, r.token_ids + out.token_ids[:-1], _n_images(r),
                          int(start[i]) + len(out.token_ids) - 1, *placement[i])
                for i, (r, out) in enumerate(zip(requests, outputs)) if r.trajectory is not None]


def _n_images(request: GenerationRequest) -> int:
    return 0 if request.image_grid_thw is None else len(request.image_grid_thw)


def _prompt_groups(requests: list[GenerationRequest]) -> tuple[list[int], list[GenerationRequest]]:
    """Each request's group, and one request per group: a group shares its tokens and its pixels."""
    group: list[int] = []
    prompts: list[GenerationRequest] = []
    by_ids: dict[tuple[int, ...], list[int]] = {}
    for r in requests:
        candidates = by_ids.setdefault(tuple(r.token_ids), [])
        g = next((g for g in candidates if _same_images(prompts[g], r)), None)
        if g is None:
            g = len(prompts)
            prompts.append(r)
            candidates.append(g)
        group.append(g)
    return group, prompts


def _same_images(a: GenerationRequest, b: GenerationRequest) -> bool:
    if a.pixel_values is None or b.pixel_values is None:
        return a.pixel_values is b.pixel_values
    return torch.equal(a.image_grid_thw, b.image_grid_thw) and torch.equal(a.pixel_values, b.pixel_values)
