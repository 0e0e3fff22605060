"""Token-in/token-out trajectories (DESIGN.md invariants 1-4) on the tiny policy and the real tools."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mmsearch.agent.config import AgentConfig
from mmsearch.agent.loop import AgentLoop
from mmsearch.engines.base import GenerationRequest, SamplingParams
from mmsearch.engines.scripted import ScriptedEngine, replay
from mmsearch.example import Example
from mmsearch.logprobs import collate, token_logprobs
from mmsearch.protocols.qwen_tools import format_tool_call, format_turn
from mmsearch.trajectory import TrajectoryBuilder


def _scene(world_dir):
    record = json.loads((world_dir / "scenes.jsonl").read_text().splitlines()[0])
    return Image.open(world_dir / record["path"]).convert("RGB")


def _call(name, **arguments):
    return format_turn(f"I will use {name}.", format_tool_call(name, arguments))


# Scripts with 0-4 tool calls; crops and image searches on returned images put tool images in the sequence.
SCRIPTS = {
    0: [],
    1: [_call("text_search", query="capital of the nation")],
    2: [_call("crop", image=0, bbox=[10, 10, 120, 100]), _call("image_search", image=1, k=2)],
    3: [_call("crop", image=0, bbox=[0, 0, 100, 80]), _call("crop", image=1, bbox=[4, 4, 60, 60]),
        _call("text_search", query="river")],
    4: [_call("crop", image=0, bbox=[0, 0, 100, 80]), _call("image_search", image=1, k=3),
        _call("text_search", query="founder"), _call("crop", image=1, bbox=[0, 0, 40, 40])],
}
ANSWER = format_turn("I know it now.", "<answer>Ibrovova</answer>")


@pytest.fixture(scope="module")
def scripted_trajectories(world_dir, hf_engine, toolbox):
    builder = TrajectoryBuilder(hf_engine.processor)
    turns = {f"ex{k}": [*calls, ANSWER] for k, calls in SCRIPTS.items()}
    engine = ScriptedEngine(hf_engine.tokenizer, replay(turns))
    loop = AgentLoop(engine, toolbox, builder, AgentConfig(max_turns=8))
    examples = [Example(f"ex{k}", "Which nation is this?", [_scene(world_dir)], ["Ibrovova"]) for k in SCRIPTS]
    return builder, turns, loop.run(examples)


@pytest.mark.parametrize("n_calls", sorted(SCRIPTS))
def test_token_ids_equal_chat_template_rendering(scripted_trajectories, n_calls):
    builder, _, trajectories = scripted_trajectories
    traj = trajectories[n_calls]
    assert traj.stop_reason == "answered" and traj.final_answer == "Ibrovova"
    assert len(traj.tool_calls) == n_calls and not any(c.is_error for c in traj.tool_calls), [c.result for c in traj.tool_calls]
    text = builder.render(traj.messages, add_generation_prompt=False)
    expected = builder.processor(text=[text], images=traj.images or None, return_tensors="pt")["input_ids"][0].tolist()
    # The template closes the last assistant turn with "<|im_end|>\n"; generation stops at <|im_end|>.
    assert traj.token_ids == expected[: len(traj.token_ids)]
    assert builder.tokenizer.decode(expected[len(traj.token_ids):]) == "\n"


@pytest.mark.parametrize("n_calls", sorted(SCRIPTS))
def test_loss_mask_is_one_exactly_on_generated_tokens(scripted_trajectories, n_calls):
    builder, turns, trajectories = scripted_trajectories
    traj = trajectories[n_calls]
    tok = builder.tokenizer
    generated = [tok(t, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
                 for t in turns[f"ex{n_calls}"]]
    # Reconstruct each masked run and compare it with what the policy wrote, turn by turn.
    runs, current = [], []
    for token, m in zip(traj.token_ids, traj.loss_mask):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    assert runs == generated
    # Every masked run starts right after "<|im_start|>assistant\n".
    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    starts = [i for i in range(1, len(traj.loss_mask)) if traj.loss_mask[i] and not traj.loss_mask[i - 1]]
    assert all(traj.token_ids[s - len(header):s] == header for s in starts)


@pytest.mark.parametrize("n_calls", sorted(SCRIPTS))
def test_image_placeholders_match_grids(scripted_trajectories, n_calls):
    builder, _, trajectories = scripted_trajectories
    traj = trajectories[n_calls]
    tok = builder.tokenizer
    pad, start, end = tok.convert_tokens_to_ids(["<|image_pad|>", "<|vision_start|>", "<|vision_end|>"])
    ids = traj.token_ids
    runs = []
    for i, token in enumerate(ids):
        if token == start:
            j = i + 1
            while ids[j] == pad:
                j += 1
            assert ids[j] == end
            runs.append(j - i - 1)
    merge = builder.processor.image_processor.merge_size
    assert len(runs) == len(traj.images) == len(traj.image_grid_thw) == len(traj.pixel_values)
    assert runs == [t * h * w // merge**2 for t, h, w in traj.image_grid_thw]
    assert ids.count(pad) == sum(runs)
    # Tool-returned images follow the question's image, each with its own grid and pixels.
    crops = sum(1 for c in traj.tool_calls if c.name == "crop")
    assert len(traj.images) == 1 + crops
    for pixels, (t, h, w) in zip(traj.pixel_values, traj.image_grid_thw):
        assert pixels.shape[0] == t * h * w


def _grow(builder, engine, trajectories, world_dir, turns=2):
    """Sampled turns from the real engine, each followed by a tool response carrying an image."""
    thumb = Image.open(next((world_dir / "images").rglob("*.png"))).convert("RGB")
    stop = [engine.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    for turn in range(turns):
        requests = [GenerationRequest(t.token_ids, t.images, t.pixel_tensor(), t.grid_tensor(), 10) for t in trajectories]
        outputs = engine.generate(requests, SamplingParams(temperature=1.0, max_new_tokens=10, seed=turn), stop)
        for traj, out in zip(trajectories, outputs):
            assert len(out.token_ids) == len(out.logprobs) > 0
            builder.add_generation(traj, out.token_ids, out.logprobs)
            builder.add_tool_response(traj, f"a result [image {len(traj.images)}]", [thumb.resize((90 + 20 * turn, 70))])


def test_recomputed_logprobs_match_engine_with_tool_images(world_dir, hf_engine):
    builder = TrajectoryBuilder(hf_engine.processor)
    # Different prompt lengths so the batch is padded at generation and right-padded at scoring; the
    # long shared system prompt makes the engine encode it once and share its KV cache across rows.
    system = "You are a careful test agent. " * 12
    trajectories = [builder.start("e", i, system, "Which nation?" + " again" * 3 * i, [_scene(world_dir)])
                    for i in range(3)]
    requests = [GenerationRequest(t.token_ids) for t in trajectories]
    assert hf_engine.shared_prefix_len(requests) > 32
    _grow(builder, hf_engine, trajectories, world_dir)
    assert all(len(t.images) == 3 for t in trajectories)
    batch = collate(trajectories, hf_engine.pad_id, hf_engine.image_token_id)
    with torch.no_grad():
        recomputed = token_logprobs(hf_engine.model, batch)
    mask = batch["loss_mask"].bool()
    diff = (recomputed[mask] - batch["rollout_logprobs"][mask]).abs().max().item()
    assert diff < 1e-4, f"rollout and recomputed log-probs differ by {diff}"

    # Control: the same pass with 1-D positions for image tokens (what MMSearch-R1/VRAG train with)
    # must be visibly wrong, or this test could not catch the bug it exists for.
    no_types = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
    with torch.no_grad():
        wrong = token_logprobs(hf_engine.model, no_types)
    assert (wrong[mask] - batch["rollout_logprobs"][mask]).abs().max().item() > 100 * max(diff, 1e-6)


@pytest.mark.parametrize("system", ["You are a test.", "You are a careful test agent. " * 12])
def test_greedy_generation_is_deterministic_and_batch_independent(world_dir, hf_engine, system):
    """A request gives the same tokens alone and in a batch (padded, and with a shared-prefix cache)."""
    builder = TrajectoryBuilder(hf_engine.processor)
    a = builder.start("e", 0, system, "Which nation?", [_scene(world_dir)])
    b = builder.start("e", 1, system, "Which nation is it, really?", [_scene(world_dir)])
    stop = [hf_engine.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    alone = hf_engine.generate([GenerationRequest(a.token_ids, a.images, a.pixel_tensor(), a.grid_tensor())], params, stop)
    batched = hf_engine.generate([GenerationRequest(t.token_ids, t.images, t.pixel_tensor(), t.grid_tensor()) for t in (b, a)],
                                 params, stop)
    assert alone[0].token_ids == batched[1].token_ids
    assert alone[0].logprobs == pytest.approx(batched[1].logprobs, abs=1e-4)


def test_truncate_cuts_ids_mask_logprobs_together_and_never_through_an_image(world_dir, hf_engine):
    builder = TrajectoryBuilder(hf_engine.processor)
    traj = builder.start("e", 0, "You are a test.", "Which nation?", [_scene(world_dir)])
    _grow(builder, hf_engine, [traj], world_dir, turns=1)
    start_id = builder.vision_start_id
    second_image = [i for i, t in enumerate(traj.token_ids) if t == start_id][1]
    traj.truncate(second_image + 5, start_id)  # lands inside the tool image's placeholder run
    assert len(traj.token_ids) == len(traj.loss_mask) == len(traj.logprobs) == second_image
    assert len(traj.pixel_values) == len(traj.image_grid_thw) == 1
    assert traj.stop_reason == "max_tokens"
    n = len(traj.token_ids)
    traj.truncate(n - 3, start_id)  # a plain cut in text
    assert len(traj.token_ids) == len(traj.loss_mask) == len(traj.logprobs) == n - 3


def test_checkpoint_generation_config_does_not_change_sampling(hf_engine):
    """Qwen checkpoints ship top_k/top_p/repetition_penalty defaults; generate() must not apply them behind our back."""
    ids = hf_engine.tokenizer("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    params, stop = SamplingParams(temperature=1.0, max_new_tokens=12, seed=3), [hf_engine.tokenizer.eos_token_id]
    before = hf_engine.generate([GenerationRequest(ids)], params, stop)[0]
    config = hf_engine.model.generation_config
    saved = (config.top_k, config.top_p, config.repetition_penalty)
    config.top_k, config.top_p, config.repetition_penalty = 1, 0.01, 1.5
    try:
        after = hf_engine.generate([GenerationRequest(ids)], params, stop)[0]
    finally:
        config.top_k, config.top_p, config.repetition_penalty = saved
    assert after.token_ids == before.token_ids
    assert after.logprobs == pytest.approx(before.logprobs, abs=1e-6)
