"""SFT samples: gold trajectories rebuilt by the rollout's own trajectory code (DESIGN.md invariant 2).

A dataset row's `messages` are replayed through `TrajectoryBuilder` exactly as the agent loop
builds a rollout: the prompt and every tool response are the chat template's deltas, each
assistant turn enters as its canonical tokens plus the end-of-turn token (what the `scripted`
engine returns), tool text is clipped to the loop's `max_tool_response_tokens`. So the loss mask is
1 exactly on assistant tokens, and an SFT sample equals a rollout of the same turns token by token.

Images a tool returned are not stored in the dataset; crops are re-made by the crop tool from the
gold call (deterministic), in the pixel space of the policy's processor, which must be the one the
dataset was synthesized for (its `synth_info.json` records the resize geometry).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from mmsearch.eval.loaders import LoadReport, SkipRecord, load_examples
from mmsearch.example import Example
from mmsearch.protocols import ProtocolError, convert_messages
from mmsearch.sft.augment import NameSwap, message_texts
from mmsearch.sft.reading import reading_fragments
from mmsearch.trajectory import Trajectory, TrajectoryBuilder, assistant_turn_ids
from tools.base import Toolbox, ToolContext
from tools.config import ToolsConfig, VisionResizeConfig
from tools.registry import build_toolbox, tool_schemas

log = logging.getLogger(__name__)


@dataclass
class SampleLimits:
    max_tool_response_tokens: int = 512  # as the agent loop clips tool text (keep equal to the eval's)
    max_seq_tokens: int = 4096  # longer samples are skipped (counted), never cut through their answer


def check_vision(data_dir: str, vision: VisionResizeConfig) -> None:
    """Refuse a dataset whose crop boxes were written for another image resize than this policy's."""
    info = Path(data_dir, "synth_info.json")
    if not info.is_file():
        return  # imported or hand-made data: nothing recorded to check against
    recorded = json.loads(info.read_text()).get("vision")
    if not recorded:
        return
    ours = {k: getattr(vision, k) for k in recorded}
    if ours != recorded:
        raise ValueError(
            f"{data_dir} was synthesized for images resized as {recorded}, but this policy's processor resizes "
            f"as {ours}: gold crop boxes would point at the wrong pixels. Synthesize again with "
            f"`--processor <this model>`."
        )


def crop_toolbox(vision: VisionResizeConfig) -> Toolbox:
    return build_toolbox(ToolsConfig(enabled=["crop"], vision=vision), backend=None)


def build_sample(builder: TrajectoryBuilder, example: Example, messages: list[dict], crops: Toolbox,
                 limits: SampleLimits) -> Trajectory:
    """One gold trajectory as a token-exact Trajectory; raises SkipRecord when it cannot be rebuilt."""
    if len(messages) < 3 or messages[0]["role"] != "system" or messages[1]["role"] != "user":
        raise SkipRecord("malformed_trajectory", "messages must start with system and user")
    protocol = builder.protocol
    try:
        schemas = tool_schemas(ToolsConfig(enabled=list(protocol.tools or ToolsConfig().enabled)))
        messages = convert_messages(messages, protocol, schemas, example.question)
    except ProtocolError as exc:
        raise SkipRecord(f"not_in_{protocol.name}", str(exc)) from None
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    first = 2 if system is not None else 1
    traj = builder.start(example.id, 0, system, example.question, example.images)
    last_call = None
    for message in messages[first:]:
        if message["role"] == "assistant":
            ids = assistant_turn_ids(builder.tokenizer, message["content"], builder.end_of_turn_id, protocol.stop_strings)
            builder.add_generation(traj, ids, None)
            last_call = protocol.parse(message["content"])
        elif message["role"] == "tool":
            text, n_images = _tool_parts(message)
            images = _tool_images(traj, last_call, n_images, crops)
            text = builder.clip_text(text, limits.max_tool_response_tokens)
            builder.add_tool_response(traj, text, images,
                                      **{k: message[k] for k in ("tool_call_id", "name") if k in message})
        else:
            raise SkipRecord("malformed_trajectory", f"unexpected {message['role']!r} message after the question")
    if messages[-1]["role"] != "assistant":
        raise SkipRecord("malformed_trajectory", "the trajectory does not end with an assistant turn")
    if len(traj.token_ids) > limits.max_seq_tokens:
        raise SkipRecord("too_long", f"{len(traj.token_ids)} tokens > max_seq_tokens {limits.max_seq_tokens}")
    return traj


def _tool_parts(message: dict) -> tuple[str, int]:
    content = message["content"]
    if isinstance(content, str):
        return content, 0
    text = "".join(p["text"] for p in content if p.get("type") == "text")
    return text, sum(1 for p in content if p.get("type") == "image")


def _tool_images(traj: Trajectory, call, n_images: int, crops: Toolbox) -> list:
    if n_images == 0:
        return []
    if call is None or call.kind != "tool_call" or call.name != "crop":
        raise SkipRecord("tool_image_unavailable", f"a {getattr(call, 'name', None)!r} result with images cannot be re-made")
    result = crops.call("crop", call.arguments, ToolContext(list(traj.images)))
    if result.is_error or len(result.images) != n_images:
        raise SkipRecord("tool_image_unavailable", f"re-running the gold crop gave: {result.text[:200]}")
    return result.images


def load_samples(data: str, split: str, builder: TrajectoryBuilder, vision: VisionResizeConfig,
                 limits: SampleLimits, limit: int | None = None, name_swap: float = 0.0, kb: str = "",
                 seed: int = 0, reading_rows: int = 0) -> tuple[list[Trajectory], LoadReport]:
    """Every row of `split` with a gold trajectory, as samples; bad rows are skipped and counted.

    With `name_swap` > 0, that share of rows also gets a renamed copy (`mmsearch.sft.augment`),
    appended after the original samples; `kb` is the KB dir (default: the one the data was made from).
    With `reading_rows` > 0, that many reading fragments of renamed rows follow (`mmsearch.sft.reading`).
    """
    check_vision(data, vision)
    examples, report = load_examples(data, split=split, limit=limit, text_only=builder.text_only)
    crops = crop_toolbox(vision)
    rows = []
    for example in examples:
        try:
            raw = example.meta.get("messages")
            if not raw:
                raise SkipRecord("no_trajectory", "the row has no gold messages")
            messages = json.loads(raw) if isinstance(raw, str) else raw
            rows.append((example, messages, build_sample(builder, example, messages, crops, limits)))
        except SkipRecord as skip:
            report.skip(example.id, skip.reason, skip.detail)
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            report.skip(example.id, "malformed_trajectory", f"{type(exc).__name__}: {exc}")
    samples = [sample for _, _, sample in rows]
    if name_swap > 0 or reading_rows > 0:
        swap = NameSwap.from_kb(kb or _data_kb(data), (text for _, messages, _ in rows for text in message_texts(messages)))
        if name_swap > 0:
            samples += _swapped_samples(rows, builder, crops, limits, name_swap, swap, seed)
        if reading_rows > 0:
            samples += _reading_samples(rows, builder, crops, limits, reading_rows, swap, seed)
    crops.close()
    report.loaded = len(samples)
    if report.skipped:
        log.warning("%s[%s]: %s; first: %s", data, split, report, report.examples_of_skipped[:3])
    return samples, report


def _data_kb(data: str) -> str:
    info = Path(data, "synth_info.json")
    kb = json.loads(info.read_text()).get("kb") if info.is_file() else None
    if not kb:
        raise ValueError(f"name swaps need the KB the data was made from: {data} records none; set the KB dir")
    return kb


def _swapped_samples(rows, builder, crops, limits, share: float, swap: NameSwap, seed: int) -> list[Trajectory]:
    """Renamed copies of a `share` of the rows (rows that mention no KB entity are left out)."""
    rng = random.Random(seed)
    out = []
    for example, messages, _ in rows:
        if rng.random() >= share:
            continue
        renamed = swap.swap(messages, rng)
        if renamed is not None:
            try:
                out.append(build_sample(builder, example, renamed, crops, limits))
            except SkipRecord:
                continue
    return out


def _reading_samples(rows, builder, crops, limits, n: int, swap: NameSwap, seed: int) -> list[Trajectory]:
    """`n` reading fragments, each row drawn at random and freshly renamed (so a row gives new names each time)."""
    rng = random.Random(f"reading:{seed}")
    readers = [(example, messages) for example, messages, _ in rows
               if any(m["role"] == "tool" and _tool_parts(m)[1] == 0 for m in messages)]
    turn_start = builder.tokenizer.convert_tokens_to_ids("<|im_start|>")
    out: list[Trajectory] = []
    for _ in range(4 * n):  # a draw can give no fragment (no name written after a text result)
        if len(out) >= n or not readers:
            break
        example, messages = rng.choice(readers)
        renamed = swap.rename(messages, rng)
        if renamed is None:
            continue
        try:
            sample = build_sample(builder, example, renamed[0], crops, limits)
        except SkipRecord:
            continue
        out += reading_fragments(sample, builder.tokenizer, renamed[1], turn_start, builder.vision_start_id)
    for i, fragment in enumerate(out[:n]):
        fragment.example_id = f"read-{i:06d}"
    return out[:n]
