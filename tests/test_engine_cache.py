"""The hf engine's KV cache across turns gives exactly what re-encoding every turn gives (issue 13).

The same rollouts run twice on the tiny policy and the real tools: with `cache_turns` (each turn
encodes only a trajectory's new tokens; the G samples of an example share one prompt prefill) and
with transformers' generate() over whole contexts. Token ids must be equal and log-probs equal
within float tolerance, greedy and seeded sampling alike.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from PIL import Image

from mmsearch.agent.config import AgentConfig, SamplingConfig
from mmsearch.agent.loop import AgentLoop
from mmsearch.engines.base import GenerationOutput, GenerationRequest, SamplingParams
from mmsearch.engines.hf import HFEngine
from mmsearch.example import Example
from mmsearch.protocols.qwen_tools import format_tool_call, format_turn
from mmsearch.trajectory import TrajectoryBuilder, assistant_turn_ids

SAMPLING = {"greedy": SamplingConfig(temperature=0.0, seed=0),
            "sampled": SamplingConfig(temperature=0.8, top_k=50, top_p=0.9, seed=7)}


def _call(name, **arguments):
    return format_turn(f"I will use {name}.", format_tool_call(name, arguments))


ANSWER = format_turn("I know it now.", "<answer>Ibrovova</answer>")
# Turns the script writes, by example and turn number; the policy writes every other turn. Every
# trajectory gets a crop's image at turn 1; example 0 answers at turn 3, example 1 at turn 5, and
# example 2 crops again and then runs on the policy until a limit ends it.
SCRIPTS = {
    0: {1: _call("crop", image=0, bbox=[10, 10, 120, 100]), 3: ANSWER},
    1: {1: _call("crop", image=0, bbox=[0, 0, 100, 80]), 3: _call("text_search", query="capital of the nation"), 5: ANSWER},
    2: {1: _call("crop", image=0, bbox=[20, 20, 200, 150]), 3: _call("crop", image=1, bbox=[4, 4, 60, 60])},
}
POLICY_LIMITS = {0: 5, 1: 9, 2: 12}  # new tokens per policy turn: rows of one batch end at different steps


class PartlyScripted:
    """The tiny policy writes every turn but the scripted ones, which are appended as if generated.

    A scripted turn skips the engine, so the policy's next request carries it and its tool result
    (a crop's image) on top of what the engine cached for that trajectory.
    """

    token_level = True

    def __init__(self, engine: HFEngine):
        self.engine = engine
        self.end_id = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def reset(self) -> None:
        self.engine.reset()

    def generate(self, requests, params, stop_token_ids):
        scripted = [SCRIPTS[_index(r.trajectory)].get(len(r.trajectory.turns)) for r in requests]
        policy = [dataclasses.replace(r, max_new_tokens=POLICY_LIMITS[_index(r.trajectory)])
                  for r, text in zip(requests, scripted) if text is None]
        generated = iter(self.engine.generate(policy, params, stop_token_ids) if policy else [])
        outputs = []
        for text in scripted:
            if text is None:
                outputs.append(next(generated))
            else:
                ids = assistant_turn_ids(self.engine.tokenizer, text, self.end_id)
                outputs.append(GenerationOutput(ids, [0.0] * len(ids), "stop"))
        return outputs


def _index(traj) -> int:
    return int(traj.example_id.removeprefix("ex"))


@pytest.fixture(scope="module")
def scene(world_dir):
    record = json.loads((world_dir / "scenes.jsonl").read_text().splitlines()[0])
    return Image.open(world_dir / record["path"]).convert("RGB")


@pytest.fixture(scope="module")
def full_engine(hf_engine) -> HFEngine:
    """The tiny policy with full attention in every layer (its first layer is windowed).

    transformers' sliding-window layers give left-padded rows log-probs ~5e-4 off the same row
    alone, so generate() over a padded batch is no exact reference for the windowed policy; the
    turn cache with windows is checked against unpadded generate() below."""
    config = copy.deepcopy(hf_engine.model.config)
    text = config.get_text_config()
    text.layer_types = ["full_attention"] * text.num_hidden_layers
    text.use_sliding_window, text.sliding_window = False, None
    model = type(hf_engine.model)(config).eval()
    model.load_state_dict(hf_engine.model.state_dict())
    return HFEngine(model, hf_engine.processor)


def _engines(engine, device: str = "cpu", **kwargs) -> tuple[HFEngine, HFEngine]:
    model = engine.model if device == "cpu" else copy.deepcopy(engine.model).to(device)
    return (HFEngine(model, engine.processor, cache_turns=True, **kwargs),
            HFEngine(model, engine.processor, cache_turns=False, **kwargs))


class ForwardLog:
    """(rows, columns, carries pixels) of every forward pass of a model, while active."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __enter__(self):
        def hook(module, args, kwargs):
            ids = kwargs["input_ids"]
            self.calls.append((ids.shape[0], ids.shape[1], kwargs.get("pixel_values") is not None))

        self.handle = self.model.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    @property
    def positions(self) -> int:
        return sum(rows * columns for rows, columns, _ in self.calls)


def _assert_same(cached, reference):
    assert [(t.example_id, t.sample) for t in cached] == [(t.example_id, t.sample) for t in reference]
    for a, b in zip(cached, reference):
        assert a.token_ids == b.token_ids, (a.example_id, a.sample)
        assert a.loss_mask == b.loss_mask
        assert [t.text for t in a.turns] == [t.text for t in b.turns]
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4), (a.example_id, a.sample)


@pytest.mark.parametrize("max_batch", [64, 4])
@pytest.mark.parametrize("sampling", sorted(SAMPLING))
def test_rollout_with_turn_cache_equals_reencoding(full_engine, toolbox, scene, sampling, max_batch):
    builder = TrajectoryBuilder(full_engine.processor)
    cfg = AgentConfig(max_turns=7, max_new_tokens_per_turn=12, sampling=SAMPLING[sampling])
    examples = [Example(f"ex{i}", "Which nation is this?" + " Really?" * i, [scene], ["Ibrovova"]) for i in SCRIPTS]
    cached_engine, reference_engine = _engines(full_engine, max_batch=max_batch)
    runs = {}
    for name, engine in (("cached", cached_engine), ("reference", reference_engine)):
        with ForwardLog(full_engine.model) as log:
            runs[name] = (AgentLoop(PartlyScripted(engine), toolbox, builder, cfg).run(examples, n_samples=2), log)
    (cached, cached_log), (reference, reference_log) = runs["cached"], runs["reference"]
    _assert_same(cached, reference)

    # The rollout is what the test means it to be: crops' images mid-trajectory, different endings.
    assert all(len(t.images) >= 2 for t in cached)
    assert len({len(t.turns) for t in cached}) >= 3
    assert not any(c.is_error for t in cached for c in t.tool_calls), [c.result for t in cached for c in t.tool_calls]
    # ... and the cache was used: far fewer positions encoded, and one prompt prefill per example.
    assert cached_log.positions < reference_log.positions / 2
    first_with_pixels = next(rows for rows, _, pixels in cached_log.calls if pixels)
    assert first_with_pixels == (len(examples) if max_batch >= 2 * len(examples) else max_batch // 2)
    assert cached_engine.turns.rows == {}  # the loop leaves no cache behind


def _grow(builder, trajectories, outputs, thumb, n_images):
    """Append generated tokens and a tool response with `n_images` images to each trajectory."""
    for traj, out in zip(trajectories, outputs):
        builder.add_generation(traj, out.token_ids, out.logprobs)
        builder.add_tool_response(traj, f"a result [image {len(traj.images)}]", [thumb] * n_images)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_stop_tokens_regrouped_rows_and_a_broken_continuation(world_dir, full_engine, scene, device):
    """A row that ends on a stop token while the others go on, rows that leave or come back in
    another order and chunk (`max_batch` 3), images in tool responses, and a request that no
    longer continues its cached row (so it is re-encoded) all match the reference, turn by turn.
    On CUDA too (fp32), where attention kernels differ on masked and padded rows."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    builder = TrajectoryBuilder(full_engine.processor)
    thumb = Image.open(next((world_dir / "images").rglob("*.png"))).convert("RGB").resize((90, 70))
    engines = _engines(full_engine, device, max_batch=3)
    states = [[builder.start("e", i, "You are a test.", "Which nation?" * (i + 1), [scene]) for i in range(4)]
              for _ in engines]
    params = SamplingParams(temperature=1.0, max_new_tokens=10)

    def requests(trajectories):
        return [GenerationRequest(t.token_ids, t.images, t.pixel_tensor(), t.grid_tensor(), trajectory=t)
                for t in trajectories]

    # A stop token that row 0 samples by its third step in the first turn ends it before the others.
    (probe, *_) = engines[1].generate(requests(states[1]), dataclasses.replace(params, seed=0), [builder.end_of_turn_id])
    stops = [builder.end_of_turn_id, probe.token_ids[min(2, len(probe.token_ids) - 1)]]
    # (which trajectories, in what order; images in their next tool response)
    schedule = [([0, 1, 2, 3], 1), ([0, 3, 1], 0), ([0, 3, 1], 2), ([3, 0], 1)]
    for turn, (order, n_images) in enumerate(schedule):
        results = []
        for engine, trajectories in zip(engines, states):
            if turn == 2:  # trajectory 1's context changes under the cache: it must be re-encoded
                trajectories[1].token_ids[5] = trajectories[1].token_ids[6]
            batch = [trajectories[i] for i in order]
            outputs = engine.generate(requests(batch), dataclasses.replace(params, seed=turn), stops)
            _grow(builder, batch, outputs, thumb, n_images)
            results.append(outputs)
        cached, reference = results
        assert [o.token_ids for o in cached] == [o.token_ids for o in reference]
        assert [o.finish_reason for o in cached] == [o.finish_reason for o in reference]
        for a, b in zip(cached, reference):
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)
        if turn == 0:
            assert cached[0].finish_reason == "stop" and len(cached[0].token_ids) <= 3


def test_reset_forgets_rows_so_new_weights_are_used(full_engine, scene):
    """After the weights change, reset() makes the next turn re-encode under the new weights."""
    model = copy.deepcopy(full_engine.model)
    cached, reference = HFEngine(model, full_engine.processor), HFEngine(model, full_engine.processor, cache_turns=False)
    builder = TrajectoryBuilder(full_engine.processor)
    params, stops = SamplingParams(temperature=0.0, max_new_tokens=6), [builder.end_of_turn_id]
    traj = builder.start("e", 0, "You are a test.", "Which nation?", [scene])

    def request():
        return [GenerationRequest(traj.token_ids, traj.images, traj.pixel_tensor(), traj.grid_tensor(), trajectory=traj)]

    (out,) = cached.generate(request(), params, stops)
    builder.add_generation(traj, out.token_ids, out.logprobs)
    builder.add_tool_response(traj, "a result", [])
    assert cached.turns.rows
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cached.reset()
    assert cached.turns.rows == {}
    with ForwardLog(model) as log:
        (after,) = cached.generate(request(), params, stops)
    assert log.calls[0][1] == len(traj.token_ids)  # the whole context, not the new tokens
    (expected,) = reference.generate(request(), params, stops)
    assert after.token_ids == expected.token_ids
    assert torch.allclose(torch.tensor(after.logprobs), torch.tensor(expected.logprobs), atol=1e-4)


def _family_model(family: str, tokenizer):
    """A random few-layer Qwen2-VL or Qwen3-VL with the tiny policy's tokenizer and image processing."""
    import transformers

    ids = tokenizer.convert_tokens_to_ids
    text = {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}}
    vision = {"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_heads": 2}
    if family == "qwen2_vl":
        vision |= {"depth": 1, "embed_dim": 32, "hidden_size": 64}
        config_cls, model_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    else:
        text |= {"head_dim": 16}
        text["rope_parameters"] |= {"mrope_interleaved": True}
        vision |= {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 64,
                   "num_position_embeddings": 256, "deepstack_visual_indexes": [0]}
        config_cls, model_cls = transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration
    config = config_cls(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                        video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                        vision_end_token_id=ids("<|vision_end|>"))
    torch.manual_seed(0)
    return model_cls(config).eval()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_other_qwen_families(world_dir, hf_engine, scene, family):
    """The cache's positions and image handling hold for Qwen2-VL and Qwen3-VL (interleaved
    multimodal rotary positions, deepstack visual features) as well."""
    model = _family_model(family, hf_engine.tokenizer)
    builder = TrajectoryBuilder(hf_engine.processor)
    thumb = Image.open(next((world_dir / "images").rglob("*.png"))).convert("RGB").resize((90, 70))
    engines = (HFEngine(model, hf_engine.processor), HFEngine(model, hf_engine.processor, cache_turns=False))
    states = [[builder.start("e", i, "You are a test.", "Which nation?" * (i + 1), [scene]) for i in range(2)]
              for _ in engines]
    for turn in range(3):
        results = []
        for engine, trajectories in zip(engines, states):
            requests = [GenerationRequest(t.token_ids, t.images, t.pixel_tensor(), t.grid_tensor(), trajectory=t)
                        for t in trajectories]
            outputs = engine.generate(requests, SamplingParams(temperature=1.0, max_new_tokens=6, seed=turn),
                                      [builder.end_of_turn_id])
            _grow(builder, trajectories, outputs, thumb, 1)
            results.append(outputs)
        cached, reference = results
        assert [o.token_ids for o in cached] == [o.token_ids for o in reference]
        for a, b in zip(cached, reference):
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)


def test_done_rows_leave_the_batch_and_their_cache_rows_carry_on(world_dir, full_engine, scene):
    """Rows whose token limit comes first leave the decode batch at once (later steps run on fewer
    rows), their cache rows are set aside and gathered, with the rows that went on, into the next
    turn's batch; tokens and log-probs stay those of the reference, turn by turn."""
    builder = TrajectoryBuilder(full_engine.processor)
    thumb = Image.open(next((world_dir / "images").rglob("*.png"))).convert("RGB").resize((90, 70))
    engines = _engines(full_engine)
    states = [[builder.start("e", i, "You are a test.", "Which nation?" * (i + 1), [scene]) for i in range(4)]
              for _ in engines]
    limits = [[2, 5, 9, 12], [12, 3, 7, 1], [6, 6, 11, 4]]  # per turn, per trajectory
    for turn, turn_limits in enumerate(limits):
        results = []
        for engine, trajectories in zip(engines, states):
            requests = [GenerationRequest(t.token_ids, t.images, t.pixel_tensor(), t.grid_tensor(), trajectory=t,
                                          max_new_tokens=n) for t, n in zip(trajectories, turn_limits)]
            with ForwardLog(full_engine.model) as log:
                outputs = engine.generate(requests, SamplingParams(temperature=1.0, max_new_tokens=12, seed=turn),
                                          [builder.end_of_turn_id])
            _grow(builder, trajectories, outputs, thumb, turn % 2)
            results.append((outputs, log))
        (cached, log), (reference, _) = results
        assert [o.token_ids for o in cached] == [o.token_ids for o in reference]
        for a, b in zip(cached, reference):
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)
        # one forward per step after the first; each row is fed only until its output's last step
        lengths = [len(o.token_ids) for o in cached]
        decode_rows = [rows for rows, columns, _ in log.calls[1:]]
        assert decode_rows == [sum(n > step + 1 for n in lengths) for step in range(max(lengths) - 1)]
        assert min(decode_rows) < len(lengths)


def test_gathered_rows_drop_masked_gaps_and_the_buffer_grows_in_place():
    """gather_rows packs each row's own columns to the right (masked gaps are dropped) with room to
    spare; a BufferLayer writes in place and grows only when that room runs out."""
    from mmsearch.engines.turn_cache import BufferLayer, CachedBatch, gather_rows

    keys = torch.arange(2 * 1 * 5 * 2, dtype=torch.float32).view(2, 1, 5, 2)
    a = CachedBatch([(keys, -keys)], torch.tensor([[0, 1, 0, 1, 1], [1, 0, 0, 0, 1]]))
    b = CachedBatch([(keys[:1, :, :2] + 100, -keys[:1, :, :2] - 100)], torch.tensor([[1, 1]]))
    cache, mask = gather_rows([(a, 1), (b, 0), (a, 0)], room=4)
    assert mask.tolist() == [[0, 1, 1], [0, 1, 1], [1, 1, 1]]
    layer = cache.layers[0]
    assert layer.keys.shape == (3, 1, 3, 2) and layer.buffers[0].shape[2] == 3 + 4
    for row, (source, index) in enumerate([(a, 1), (b, 0), (a, 0)]):
        own = source.kv[0][0][index, :, source.mask[index].bool()]
        assert torch.equal(layer.keys[row, :, 3 - own.shape[1]:], own)
        assert torch.equal(layer.values[row, :, 3 - own.shape[1]:], -own)
    buffer = layer.buffers[0]
    layer.update(torch.ones(3, 1, 4, 2), torch.ones(3, 1, 4, 2))
    assert layer.buffers[0] is buffer and layer.keys.shape[2] == 7  # written in place
    layer.update(torch.full((3, 1, 1, 2), 2.0), torch.full((3, 1, 1, 2), 2.0))
    assert layer.keys.shape[2] == 8 and layer.buffers[0].shape[2] >= 8
    assert torch.equal(layer.keys[:, :, 3:7], torch.ones(3, 1, 4, 2)) and bool((layer.keys[:, :, 7] == 2).all())
    assert isinstance(layer, BufferLayer)


def test_windowed_layers_count_their_window_in_a_rows_own_tokens():
    """A sliding-window layer's mask over cached columns with gaps: a query sees its row's last
    `window` own tokens (itself included), however many masked columns lie between them."""
    from mmsearch.engines.turn_cache import own_column_masks

    columns = torch.tensor([[0, 1, 0, 0, 1, 1, 1],   # own tokens at 1, 4, 5, 6
                            [1, 1, 1, 0, 0, 1, 0]])  # the last column is padding
    masks = own_column_masks(columns, queries=2, windows={"sliding_attention": 2, "full_attention": None})
    sliding, full = masks["sliding_attention"][:, 0], masks["full_attention"][:, 0]
    assert sliding.shape == (2, 2, 7)
    assert sliding[0].nonzero().tolist() == [[0, 4], [0, 5], [1, 5], [1, 6]]
    assert full[0, 1].nonzero().squeeze(1).tolist() == [1, 4, 5, 6]
    assert sliding[1, 0].nonzero().squeeze(1).tolist() == [2, 5]  # across the gap at 3-4
    assert sliding[1, 1].nonzero().squeeze(1).tolist() == [6] == full[1, 1].nonzero().squeeze(1).tolist()  # padding: itself
    eager = own_column_masks(columns, 2, {"sliding_attention": 2}, eager=True)["sliding_attention"]
    assert eager.dtype == torch.float32 and torch.equal(eager == 0, masks["sliding_attention"])


def test_windowed_policy_rollout_with_turn_cache_equals_generate_row_by_row(hf_engine, toolbox, scene):
    """The default tiny policy (layer 0 windowed): batched cached rollouts through the loop and the
    real tools equal generate() run on one request at a time (no padding)."""
    assert hf_engine.windows == {"sliding_attention": 2, "full_attention": None}
    builder = TrajectoryBuilder(hf_engine.processor)
    cfg = AgentConfig(max_turns=7, max_new_tokens_per_turn=12, sampling=SAMPLING["greedy"])
    examples = [Example(f"ex{i}", "Which nation is this?" + " Really?" * i, [scene], ["Ibrovova"]) for i in SCRIPTS]
    cached_engine = HFEngine(hf_engine.model, hf_engine.processor, max_batch=64)
    reference_engine = HFEngine(hf_engine.model, hf_engine.processor, cache_turns=False, max_batch=1)
    cached, reference = (AgentLoop(PartlyScripted(engine), toolbox, builder, cfg).run(examples, n_samples=2)
                         for engine in (cached_engine, reference_engine))
    _assert_same(list(cached), list(reference))
