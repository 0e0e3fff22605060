"""The vLLM engine: its pure helpers on CPU (no vLLM needed), the engine itself on a GPU.

The mapping test feeds `to_generation_output` a stand-in with the attribute names of vLLM's
`CompletionOutput` / `Logprob` (the only stand-in here: a pure mapping function needs no engine).
"""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch

from mmsearch.engines.base import GenerationRequest, SamplingParams
from mmsearch.engines.vllm_engine import (
    INSTALL_HINT,
    VLLMEngineError,
    build_prompt,
    check_expansion,
    collapse_image_runs,
    image_run_lengths,
    placeholder_config,
    sampling_kwargs,
    to_generation_output,
    truncates,
)

PAD, START, END = 99, 97, 98


def _expanded(*runs: int) -> list[int]:
    """Text with one image per run length: 1 2 <vs> pad*n <ve> 3 …"""
    ids = [1, 2]
    for n in runs:
        ids += [START, *([PAD] * n), END, 3]
    return ids


def test_run_lengths_from_grids():
    assert image_run_lengths(torch.tensor([[1, 4, 6], [1, 2, 2]]), merge_size=2) == [6, 1]
    assert image_run_lengths([[2, 4, 4]], merge_size=2) == [8]
    with pytest.raises(ValueError, match="not divisible"):
        image_run_lengths([[1, 3, 3]], merge_size=2)


def test_collapse_each_run_to_one_pad():
    ids = _expanded(6, 1, 4)
    collapsed = collapse_image_runs(ids, PAD, [6, 1, 4])
    assert collapsed == _expanded(1, 1, 1)
    assert collapse_image_runs(ids, PAD) == collapsed  # maximal runs give the same when runs are apart
    assert collapse_image_runs([1, 2, 3], PAD) == [1, 2, 3]


def test_collapse_keeps_adjacent_images_apart():
    ids = [1, *([PAD] * 4), *([PAD] * 2), 2]  # two images with no separator between their runs
    assert collapse_image_runs(ids, PAD, [4, 2]) == [1, PAD, PAD, 2]
    assert collapse_image_runs(ids, PAD) == [1, PAD, 2]  # without grids they cannot be told apart


@pytest.mark.parametrize("lengths", [[6, 2], [6], [6, 1, 1], [5, 1], [7, 1]])
def test_collapse_rejects_runs_that_disagree_with_grids(lengths):
    with pytest.raises(ValueError, match=r"image placeholder runs \[6, 1\] do not match the image grids"):
        collapse_image_runs(_expanded(6, 1), PAD, lengths)


def test_build_prompt_on_a_real_trajectory(policy_dir):
    """A real Qwen2.5-VL processor's trajectory (two images of different sizes, one returned by a tool):
    the collapsed prompt is exactly the chat template's text tokenized with one placeholder per image,
    which is the prompt vLLM's own processor expands."""
    from PIL import Image
    from transformers import AutoProcessor

    from mmsearch.trajectory import TrajectoryBuilder

    processor = AutoProcessor.from_pretrained(policy_dir)
    tok = processor.tokenizer
    builder = TrajectoryBuilder(processor)
    question_image, tool_image = Image.new("RGB", (90, 60), (200, 30, 30)), Image.new("RGB", (56, 112), (0, 90, 200))
    traj = builder.start("ex", 0, "You are a visual search agent.", "Which flag is this?", [question_image])
    turn = '<think>look closer</think><tool_call>{"name": "crop", "arguments": {"image": 0}}</tool_call><|im_end|>'
    builder.add_generation(traj, tok(turn, add_special_tokens=False)["input_ids"], None)
    builder.add_tool_response(traj, "[image 1]", [tool_image])
    request = GenerationRequest(traj.token_ids, traj.images, traj.pixel_tensor(), traj.grid_tensor())

    image_token_id, merge_size = placeholder_config(str(policy_dir))
    assert image_token_id == tok.convert_tokens_to_ids("<|image_pad|>") and merge_size == 2
    lengths = image_run_lengths(request.image_grid_thw, merge_size)
    assert len(set(lengths)) == 2 and traj.token_ids.count(image_token_id) == sum(lengths)

    prompt, collapsed = build_prompt(request, image_token_id, merge_size)
    assert collapsed == tok(traj.rendered, add_special_tokens=False)["input_ids"]
    assert prompt["prompt_token_ids"] == collapsed and collapsed.count(image_token_id) == 2
    assert prompt["multi_modal_data"]["image"] == [question_image, tool_image]

    text_only, ids = build_prompt(GenerationRequest([5, 6, 7]), image_token_id, merge_size)
    assert text_only == {"prompt_token_ids": [5, 6, 7]} and ids == [5, 6, 7]
    with pytest.raises(ValueError, match="2 images but 1 image grids"):
        build_prompt(GenerationRequest(traj.token_ids, traj.images, image_grid_thw=request.image_grid_thw[:1]),
                     image_token_id, merge_size)
    with pytest.raises(ValueError, match="2 image placeholder runs for 3 images"):
        build_prompt(GenerationRequest(traj.token_ids, [*traj.images, tool_image]), image_token_id, merge_size)


def test_sampling_kwargs():
    kw = sampling_kwargs(SamplingParams(temperature=0.8, top_p=1.0, top_k=0, max_new_tokens=512, seed=7),
                         max_tokens=100, stop_token_ids=(151645, 151643), index=3)
    assert kw["max_tokens"] == 100 and kw["stop_token_ids"] == [151645, 151643]
    assert kw["seed"] == 10 and kw["top_k"] == 0 and kw["logprobs"] == 0 and kw["ignore_eos"] is True
    assert kw["n"] == 1 and kw["detokenize"] is False
    assert sampling_kwargs(SamplingParams(seed=None), 5, [1], 0)["seed"] is None


def test_truncation_detected():
    assert not truncates(SamplingParams(temperature=1.0, top_p=1.0, top_k=0))
    assert not truncates(SamplingParams(temperature=0.0, top_p=0.5, top_k=5))  # greedy: nothing is sampled
    assert truncates(SamplingParams(temperature=1.0, top_p=0.95))
    assert truncates(SamplingParams(temperature=0.7, top_k=50))


def _completion(token_ids, finish, logprobs="auto"):
    if logprobs == "auto":
        logprobs = [{t: SimpleNamespace(logprob=-0.5 * (i + 1), rank=1, decoded_token=None), t + 1000:
                     SimpleNamespace(logprob=-9.0, rank=2, decoded_token=None)} for i, t in enumerate(token_ids)]
    return SimpleNamespace(index=0, text="", token_ids=token_ids, logprobs=logprobs, finish_reason=finish)


def test_output_mapping():
    out = to_generation_output(_completion((5, 6, 151645), "stop"))
    assert out.token_ids == [5, 6, 151645] and out.finish_reason == "stop"
    assert out.logprobs == [-0.5, -1.0, -1.5]  # the sampled token's entry, not the other candidate's
    assert to_generation_output(_completion([5, 6], "length")).finish_reason == "length"


@pytest.mark.parametrize(("completion", "message"), [
    (_completion([5], "abort"), "unexpected finish reason"),
    (_completion([5], "stop", logprobs=None), "no log-probs"),
    (_completion([5, 6], "stop", logprobs=[{5: SimpleNamespace(logprob=-1.0)}]), "1 log-prob positions for 2"),
    (_completion([5], "stop", logprobs=[{7: SimpleNamespace(logprob=-1.0)}]), "no log-prob for the sampled token 5"),
])
def test_output_mapping_rejects(completion, message):
    with pytest.raises(VLLMEngineError, match=message):
        to_generation_output(completion)


def test_expansion_check():
    ours = _expanded(6, 1)
    sent = collapse_image_runs(ours, PAD, [6, 1])
    check_expansion(ours, ours, sent)
    check_expansion(sent, ours, sent)  # vLLM echoing what it was sent proves nothing either way
    check_expansion(None, ours, sent)
    with pytest.raises(VLLMEngineError, match="resizes differently"):
        check_expansion(_expanded(4, 1), ours, sent)


def test_missing_vllm_says_how_to_install():
    try:
        import vllm  # noqa: F401
    except ImportError:
        from mmsearch.engines.vllm_engine import VLLMEngine

        with pytest.raises(ImportError, match=r"mmsearch\[gpu\]"):
            VLLMEngine("/nonexistent")
    else:
        pytest.skip("vLLM is installed")
    assert "CUDA GPU" in INSTALL_HINT


@pytest.mark.gpu
def test_vllm_generates_tokens_and_logprobs():
    pytest.importorskip("vllm")
    policy = os.environ.get("MMSEARCH_TEST_POLICY")
    if not policy:
        pytest.skip("set MMSEARCH_TEST_POLICY to a Qwen2-VL/Qwen2.5-VL model dir")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from PIL import Image
    from transformers import AutoProcessor

    from mmsearch.engines.vllm_engine import VLLMEngine

    processor = AutoProcessor.from_pretrained(policy)
    image = Image.new("RGB", (224, 168), (200, 40, 40))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is this?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    request = GenerationRequest(token_ids=inputs["input_ids"][0].tolist(), images=[image],
                                pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    tok = processor.tokenizer
    stops = [tok.convert_tokens_to_ids("<|im_end|>")]

    engine = VLLMEngine(policy, gpu_memory_utilization=0.5, max_model_len=4096, max_images_per_prompt=2)
    sampled = engine.generate([request, request], SamplingParams(temperature=1.0, max_new_tokens=24, seed=0), stops)
    greedy = engine.generate([request], SamplingParams(temperature=0.0, max_new_tokens=24), stops)
    for out in [*sampled, *greedy]:
        assert 0 < len(out.token_ids) <= 24 and len(out.logprobs) == len(out.token_ids)
        assert all(math.isfinite(lp) and lp <= 1e-6 for lp in out.logprobs)
        assert out.finish_reason in ("stop", "length")
        if out.finish_reason == "stop":
            assert out.token_ids[-1] in stops  # the stop token is kept
    again = engine.generate([request], SamplingParams(temperature=0.0, max_new_tokens=24), stops)
    assert again[0].token_ids == greedy[0].token_ids  # log-probs may differ in the last bits (prefix cache hit)
