"""`vllm` engine: token-in/token-out generation with vLLM's offline `LLM`, for rollouts on a GPU.

Optional: needs `pip install 'mmsearch[gpu]'` and a CUDA GPU. It is written against vLLM's current
API (v1 engine) and has not been run in this repository yet; the pure helpers below are tested on
CPU, the engine itself by a GPU-marked test. What it relies on, and where vLLM says so:

* **Prompts.** `LLM.generate` takes `TokensPrompt(prompt_token_ids=…, multi_modal_data={"image": [PIL…]})`.
  For a *token* prompt vLLM never asks whether image placeholders are already expanded: its
  multimodal processor returns `is_update_applied=False` for token input
  (`BaseMultiModalProcessor._apply_hf_processor_main`) and then replaces the first `<|image_pad|>`
  of each image with `grid_t*grid_h*grid_w/merge²` copies (Qwen2-VL's `PromptReplacement`,
  target = one `<|image_pad|>`). Our trajectories hold every run already expanded, so each run is
  collapsed to one token before sending (`collapse_image_runs`); vLLM re-expands it from the same
  images with the checkpoint's image processor. The expanded prompt vLLM reports back is compared
  with ours, so a resize mismatch (other min/max pixels) is an error, never misplaced image tokens.
* **Log-probs.** `GenerationOutput.logprobs` must be log p(token) under the temperature-scaled
  distribution *without* top-k/top-p truncation (what the trainer recomputes). vLLM's default
  `logprobs_mode="raw_logprobs"` is the model's temperature-1 distribution, before any processing;
  `"processed_logprobs"` is the log-softmax of the logits after penalties, temperature, min-p *and*
  top-k/top-p masking (`vllm/v1/sample/sampler.py`, `TopKTopPSampler.forward_native`). No mode gives
  "temperature but no truncation", so we use `processed_logprobs`, which is exactly our definition
  whenever top_k is off and top_p == 1 (the RL setting). With truncation it is the log-prob under the
  truncated, renormalised distribution: ours minus log(kept probability mass), never lower than
  ours. The engine warns once when asked for that. Greedy requests get temperature-1 log-probs, as
  the interface says (vLLM computes them from the unscaled logits).
* **Stops.** `stop_token_ids` stop generation and stay in `token_ids` (the scheduler appends the
  sampled token, then `check_stop` finishes the request on it; only *text* drops special stop
  tokens). `ignore_eos=True` keeps the stop set exactly ours: otherwise vLLM adds the tokenizer's
  EOS and the checkpoint's generation_config EOS ids (`SamplingParams.update_from_generation_config`).
* **Weights.** `update_weights` runs `model.load_weights(chunk)` inside each worker through
  `LLM.apply_model` (present from vLLM 0.9 to the current release; in-process the tensors go by
  reference), chunk by chunk with the names checked first (`vllm_weights.push_weights`), then resets
  the prefix cache (KV computed with the old weights) and the encoder cache (vision embeddings, keyed
  only by the image's hash). vLLM's newer weight-transfer engines (`WeightTransferConfig`, NCCL or CUDA
  IPC) are for an engine in another process; a colocated in-process engine needs neither.
* **Sleep.** With `enable_sleep_mode=True` in `llm_kwargs`, `sleep(level)` frees the engine's GPU memory
  between rollouts (`LLM.sleep`: level 1 keeps the weights in CPU memory, level 2 drops them) and
  `wake_up(tags)` takes it back (`LLM.wake_up(tags=["weights"])` / `["kv_cache"]`), as vLLM's sleep-mode
  docs describe for RL weight updates: wake the weights, load them, then wake the KV cache.

Targets vLLM's V1 engine (0.11 or later: `LLM.sleep`/`wake_up(tags=...)`, `LLM.reset_prefix_cache`,
`LLMEngine.reset_encoder_cache`).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable, Sequence

import torch

from mmsearch.engines.base import GenerationOutput, GenerationRequest, SamplingParams
from mmsearch.engines.vllm_weights import PushReport, push_weights

logger = logging.getLogger(__name__)

INSTALL_HINT = "the vllm engine needs vLLM and a CUDA GPU: pip install 'mmsearch[gpu]'"
# The engine config's dtype names (shared with the hf engine) in vLLM's spelling.
_DTYPES = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class VLLMEngineError(RuntimeError):
    """vLLM produced something the token-exact contract cannot accept."""


# ---- pure helpers (tested on CPU without vLLM) ---------------------------------------------------


def image_run_lengths(image_grid_thw: torch.Tensor | Sequence[Sequence[int]], merge_size: int) -> list[int]:
    """Placeholder tokens per image: grid_t * grid_h * grid_w / merge_size²."""
    merge = merge_size * merge_size
    lengths = []
    for t, h, w in (torch.as_tensor(image_grid_thw).tolist()):
        if (t * h * w) % merge:
            raise ValueError(f"image grid {[t, h, w]} is not divisible by merge_size²={merge}")
        lengths.append(t * h * w // merge)
    return lengths


def collapse_image_runs(token_ids: Sequence[int], image_token_id: int,
                        run_lengths: Sequence[int] | None = None) -> list[int]:
    """`token_ids` with each image's `<|image_pad|>` run reduced to a single `<|image_pad|>`.

    With `run_lengths` (from `image_run_lengths`), runs are consumed image by image and must match
    them exactly, so adjacent images are kept apart and a run of the wrong length is an error
    (invariant 3). Without, every maximal run counts as one image.
    """
    out: list[int] = []
    i, n = 0, len(token_ids)
    image = 0
    while i < n:
        if token_ids[i] != image_token_id:
            out.append(token_ids[i])
            i += 1
            continue
        if run_lengths is None:
            while i < n and token_ids[i] == image_token_id:
                i += 1
        else:
            end = i + run_lengths[image] if image < len(run_lengths) else -1
            if end < 0 or end > n or any(t != image_token_id for t in token_ids[i:end]):
                raise _run_mismatch(token_ids, image_token_id, run_lengths)
            i = end
        out.append(image_token_id)
        image += 1
    if run_lengths is not None and image != len(run_lengths):
        raise _run_mismatch(token_ids, image_token_id, run_lengths)
    return out


def _run_mismatch(token_ids: Sequence[int], image_token_id: int, run_lengths: Sequence[int]) -> ValueError:
    runs, length = [], 0
    for t in [*token_ids, None]:
        if t == image_token_id:
            length += 1
        elif length:
            runs.append(length)
            length = 0
    return ValueError(f"image placeholder runs {runs} do not match the image grids' {list(run_lengths)} tokens")


def truncates(params: SamplingParams) -> bool:
    """Whether sampling truncates the distribution (then vLLM's log-probs are the truncated ones)."""
    return params.temperature > 0 and (params.top_k > 0 or params.top_p < 1.0)


def sampling_kwargs(params: SamplingParams, max_tokens: int, stop_token_ids: Sequence[int], index: int) -> dict:
    """Keyword arguments for one request's `vllm.SamplingParams`.

    Request `index` gets seed `seed + index`, so n samples of one prompt differ yet reproduce.
    vLLM reads top_k 0 (or -1) as "off", as we do; logprobs=0 returns the sampled token's only.
    """
    return {
        "n": 1,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": max(params.top_k, 0),
        "max_tokens": max_tokens,
        "stop_token_ids": list(stop_token_ids),
        "ignore_eos": True,
        "logprobs": 0,
        "seed": None if params.seed is None else params.seed + index,
        # We keep ids; text is the trajectory builder's job, except that stop strings are matched on text.
        # The token that completes a stop string stays in `token_ids` (vLLM cuts only the text).
        "detokenize": bool(params.stop_strings),
        "stop": list(params.stop_strings) or None,
        "include_stop_str_in_output": True,
        # Vision placeholders must never be sampled (see SamplingParams.suppress_token_ids). vLLM applies
        # logit_bias before processed log-probs, so those renormalize over the allowed tokens; a policy
        # that puts real mass on these tokens is broken anyway.
        "logit_bias": {int(t): -1e4 for t in params.suppress_token_ids} or None,
    }


def to_generation_output(completion) -> GenerationOutput:
    """Map a vLLM `CompletionOutput` (`token_ids`, `logprobs`, `finish_reason`) to ours.

    `logprobs` holds one `{token_id: Logprob}` per generated token (a list, or vLLM's
    `FlatLogprobs`, which indexes the same way); we take the sampled token's entry.
    """
    token_ids = [int(t) for t in completion.token_ids]
    if completion.logprobs is None:
        raise VLLMEngineError("vLLM returned no log-probs (SamplingParams.logprobs must be 0)")
    if len(completion.logprobs) != len(token_ids):
        raise VLLMEngineError(f"{len(completion.logprobs)} log-prob positions for {len(token_ids)} tokens")
    logprobs = []
    for pos, token in enumerate(token_ids):
        entry = completion.logprobs[pos].get(token)
        if entry is None:
            raise VLLMEngineError(f"no log-prob for the sampled token {token} at position {pos}")
        logprobs.append(float(entry.logprob))
    reason = completion.finish_reason
    if reason not in ("stop", "length"):
        raise VLLMEngineError(f"unexpected finish reason {reason!r} (only stop tokens and length limits end a turn)")
    return GenerationOutput(token_ids, logprobs, reason)


def check_expansion(reported: Sequence[int] | None, expanded: Sequence[int], sent: Sequence[int]) -> None:
    """The prompt vLLM ran must be ours: its re-expansion of the images must reproduce our runs."""
    if reported is None or list(reported) == list(expanded) or list(reported) == list(sent):
        return
    raise VLLMEngineError(
        f"vLLM expanded the images to a {len(reported)}-token prompt, ours has {len(expanded)} tokens: its "
        "image processor resizes differently from the one that built the trajectory (pass the same "
        "min_pixels/max_pixels via mm_processor_kwargs)"
    )


def placeholder_config(model: str) -> tuple[int | None, int]:
    """(`<|image_pad|>` id, spatial merge size) from a Qwen2-VL/Qwen2.5-VL/Qwen3-VL checkpoint's config;
    (None, 1) for a text-only causal LM, which has no image placeholders."""
    from transformers import AutoConfig

    from mmsearch.model.policy import is_vision_language

    config = AutoConfig.from_pretrained(model)
    if not is_vision_language(config):
        return None, 1
    return int(config.image_token_id), int(config.vision_config.spatial_merge_size)


def build_prompt(request: GenerationRequest, image_token_id: int, merge_size: int) -> tuple[dict, list[int]]:
    """The `TokensPrompt` (a TypedDict, so a plain dict) vLLM gets for `request`, and its token ids.

    Every image's placeholder run is collapsed to one `<|image_pad|>` (vLLM expands it again), checked
    against the request's image grids when it has them.
    """
    if not request.images:
        return {"prompt_token_ids": list(request.token_ids)}, list(request.token_ids)
    lengths = None
    if request.image_grid_thw is not None:
        lengths = image_run_lengths(request.image_grid_thw, merge_size)
        if len(lengths) != len(request.images):
            raise ValueError(f"{len(request.images)} images but {len(lengths)} image grids")
    collapsed = collapse_image_runs(request.token_ids, image_token_id, lengths)
    runs = collapsed.count(image_token_id)
    if runs != len(request.images):
        raise ValueError(f"{runs} image placeholder runs for {len(request.images)} images")
    return {"prompt_token_ids": collapsed, "multi_modal_data": {"image": list(request.images)}}, collapsed


def checkpoint_architecture(model: str) -> str:
    """The checkpoint's model class (`config.architectures[0]`), which names vLLM's class for it."""
    from transformers import AutoConfig

    architectures = AutoConfig.from_pretrained(model).architectures or []
    if not architectures:
        raise ValueError(f"{model}: config.json names no architecture")
    return architectures[0]


def _load_weights(model, weights: list[tuple[str, torch.Tensor]]):
    """Runs inside each vLLM worker (via `LLM.apply_model`): vLLM's loader maps HF names to its own."""
    return model.load_weights(weights)


def _parameter_names(model) -> set[str]:
    """Runs inside each vLLM worker: the parameters a weight push must cover."""
    return {name for name, _ in model.named_parameters()}


# ---- the engine ------------------------------------------------------------------------------------


class VLLMEngine:
    """A `TokenEngine` over `vllm.LLM`.

    `in_process=True` (the default) runs vLLM's engine core in this process
    (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, as colocated RL trainers do), so `update_weights` hands the
    trainer's tensors to `load_weights` by reference. With it off, vLLM must pickle the loader and
    copy every tensor to its engine process (set `VLLM_ALLOW_INSECURE_SERIALIZATION=1`).
    `llm_kwargs` go to `vllm.LLM` unchanged (e.g. `enable_sleep_mode`, `max_num_seqs`).
    """

    token_level = True

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        max_images_per_prompt: int = 8,
        tensor_parallel_size: int = 1,
        seed: int = 0,
        enable_prefix_caching: bool = True,
        mm_processor_kwargs: dict | None = None,
        in_process: bool = True,
        llm_kwargs: dict | None = None,
    ):
        try:
            from vllm import LLM
            from vllm import SamplingParams as VLLMSamplingParams
        except ImportError as exc:
            raise ImportError(INSTALL_HINT) from exc

        if in_process:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.image_token_id, self.merge_size = placeholder_config(model)
        self.architecture = checkpoint_architecture(model)
        self._sampling_params = VLLMSamplingParams
        self._warned_truncation = False
        self._asleep: set[str] = set()  # which of "weights", "kv_cache" are released
        self._weights_valid = True  # False after a level-2 sleep until update_weights restores them
        self._parameter_names: set[str] | None = None
        self.llm = LLM(
            model=model,
            dtype=_DTYPES.get(dtype, dtype),
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            enable_prefix_caching=enable_prefix_caching,
            **({"limit_mm_per_prompt": {"image": max_images_per_prompt}, "mm_processor_kwargs": mm_processor_kwargs}
               if self.image_token_id is not None else {}),
            logprobs_mode="processed_logprobs",
            # Sampling is set in full per request; the checkpoint's generation_config must not add to it.
            generation_config="vllm",
            **(llm_kwargs or {}),
        )

    def generate(self, requests: list[GenerationRequest], params: SamplingParams,
                 stop_token_ids: list[int]) -> list[GenerationOutput]:
        if self._asleep or not self._weights_valid:
            raise VLLMEngineError("the engine is asleep or its weights were dropped: update_weights and wake_up "
                                  "before generating")
        if truncates(params) and not self._warned_truncation:
            self._warned_truncation = True
            logger.warning(
                "top_k=%s / top_p=%s truncate sampling: vLLM reports log-probs of the truncated distribution "
                "(higher than the untruncated ones the trainer recomputes by -log(kept mass))",
                params.top_k, params.top_p,
            )
        results: list[GenerationOutput | None] = [None] * len(requests)
        prompts, sampling, expected, sent, slots = [], [], [], [], []
        for i, request in enumerate(requests):
            limit = min(request.max_new_tokens or params.max_new_tokens, params.max_new_tokens)
            if limit <= 0:
                results[i] = GenerationOutput([], [], "length")
                continue
            prompt, collapsed = build_prompt(request, self.image_token_id, self.merge_size)
            prompts.append(prompt)
            sampling.append(self._sampling_params(**sampling_kwargs(params, limit, stop_token_ids, i)))
            expected.append(request.token_ids)
            sent.append(collapsed)
            slots.append(i)
        if prompts:
            outputs = self.llm.generate(prompts, sampling_params=sampling, use_tqdm=False)
            for slot, out, ours, collapsed in zip(slots, outputs, expected, sent):
                check_expansion(out.prompt_token_ids, ours, collapsed)
                results[slot] = to_generation_output(out.outputs[0])
        return results  # type: ignore[return-value]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], chunk_bytes: int = 1 << 30
                       ) -> PushReport:
        """Load new policy weights (HF parameter names, as in `model.state_dict()`) into every worker.

        Names are checked before anything loads; tensors go in chunks of at most `chunk_bytes`, and every
        vLLM parameter must receive one. A sleeping engine gets its weight memory back first (its KV cache
        stays released until `wake_up`). Then what was computed with the old weights is dropped: the prefix
        cache (KV blocks) and the encoder cache (image embeddings keyed only by the image's hash), or the
        next rollout would silently mix old and new policies.
        """
        reset_encoder_cache = getattr(self.llm.llm_engine, "reset_encoder_cache", None)
        if reset_encoder_cache is None:  # checked first: refuse before any weight changes
            raise VLLMEngineError(
                "this vLLM cannot reset its encoder cache, so image embeddings computed with the old weights "
                "would be reused after an update; upgrade vLLM"
            )
        if "weights" in self._asleep:
            self.wake_up(["weights"])
        if self._parameter_names is None:
            self._parameter_names = set.intersection(*map(set, self.llm.apply_model(_parameter_names)))

        def load(chunk: list[tuple[str, torch.Tensor]]) -> set[str]:
            per_worker = self.llm.apply_model(functools.partial(_load_weights, weights=chunk))
            return set.intersection(*(set(names or ()) for names in per_worker))

        report = push_weights(named_tensors, load, self.architecture, chunk_bytes, expected=self._parameter_names)
        self.llm.reset_prefix_cache()
        reset_encoder_cache()
        self._weights_valid = True
        return report

    def sleep(self, level: int) -> None:
        """Release the engine's GPU memory (needs `enable_sleep_mode=True`): level 1 moves the weights to CPU
        memory and drops the KV cache; level 2 drops both (the next `update_weights` must restore them)."""
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        self.llm.sleep(level=level)
        self._asleep = {"weights", "kv_cache"}
        if level == 2:
            self._weights_valid = False

    def wake_up(self, tags: Sequence[str] = ("weights", "kv_cache")) -> None:
        """Take back the GPU memory `sleep` released, for `tags` ("weights", "kv_cache") that are asleep."""
        waking = [tag for tag in tags if tag in self._asleep]
        if not waking:
            return
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the trainer's cached, unused blocks go back to the device first
        self.llm.wake_up(tags=waking)
        self._asleep -= set(waking)
