"""Trajectories built token-in/token-out (DESIGN.md invariants 1-3).

A trajectory grows in two ways. Generated tokens are appended exactly as the engine produced them
(mask 1, with the engine's log-probs). Everything else (the prompt, each tool response) is the
chat template's *delta*: the template renders the whole conversation as text, the text rendered so
far is cut off its front, and only the rest is tokenized (by the processor, which also expands each
image into its `<|image_pad|>` run and returns its pixels). Nothing generated is ever decoded and
re-encoded, so no token drifts between rollout and training.

The protocol (mmsearch/protocols) decides the rendering. With chat-turn protocols every piece meets
the next at a special token, so the ids also equal the whole rendering tokenized at once. An inline
protocol (Search-R1) inserts results into the assistant's own message: there the ids decode to the
rendering and each piece is its own tokenization, as the papers build it; tokenizing the whole text
at once could merge tokens across a piece's edge, which is why nothing is ever re-tokenized.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from mmsearch.model.policy import as_processor, images_refused, is_text_only
from mmsearch.protocols import DEFAULT, Protocol, get_protocol


class TemplateError(RuntimeError):
    """The chat template re-renders earlier turns differently, so deltas cannot be taken."""


@dataclass
class ToolCallRecord:
    turn: int
    name: str
    arguments: Any
    result: str
    is_error: bool
    new_images: list[int] = field(default_factory=list)  # numbers of the images it returned
    box: list[int] | None = None  # crop: where it cut, in pixels of the source image as stored (ToolResult.box)


@dataclass
class TurnRecord:
    text: str  # the assistant's text (without its end-of-turn token)
    action: str  # tool_call | answer | invalid
    error: str = ""  # why the action was invalid
    has_think: bool = False
    n_tokens: int = 0
    finish_reason: str = "stop"  # stop | length


@dataclass
class Trajectory:
    example_id: str
    sample: int  # which of the n samples of this example
    messages: list[dict]  # DESIGN.md message schema; images referenced by number
    images: list[Image.Image]  # in order of appearance
    token_exact: bool = True  # False for text-only engines (openai): no ids, not trainable
    token_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # engine's log-prob where mask is 1, else 0
    pixel_values: list[torch.Tensor] = field(default_factory=list)  # one (patches, dim) tensor per image
    image_grid_thw: list[list[int]] = field(default_factory=list)  # one [t, h, w] per image
    turns: list[TurnRecord] = field(default_factory=list)
    tool_calls: list[ToolCallRecord] = field(default_factory=list)
    final_answer: str | None = None
    stop_reason: str | None = None  # answered | max_turns | max_tokens | invalid_actions
    rewards: dict[str, float] = field(default_factory=dict)
    rendered: str = ""  # the template text so far (image placeholders unexpanded)
    invalid_streak: int = 0
    protocol: str = DEFAULT  # what the turns are written in (mmsearch/protocols): how to read them back

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    @property
    def n_generated(self) -> int:
        return sum(t.n_tokens for t in self.turns)

    def calls_of(self, tool: str) -> int:
        return sum(1 for c in self.tool_calls if c.name == tool)

    def grid_tensor(self) -> torch.Tensor | None:
        return torch.tensor(self.image_grid_thw, dtype=torch.long) if self.image_grid_thw else None

    def pixel_tensor(self) -> torch.Tensor | None:
        return torch.cat(self.pixel_values) if self.pixel_values else None

    def truncate(self, max_tokens: int, vision_start_id: int) -> None:
        """Cut ids, mask and log-probs together to at most `max_tokens`, never through an image.

        An image whose placeholder run would be cut is dropped whole (the cut moves to its
        <|vision_start|>), with its pixels and grid, so invariant 3 still holds.
        """
        if len(self.token_ids) <= max_tokens:
            return
        cut = max_tokens
        starts = [i for i, t in enumerate(self.token_ids) if t == vision_start_id]
        kept = sum(1 for s in starts if s < cut)
        if kept and self._image_end(starts[kept - 1]) > cut:
            cut, kept = starts[kept - 1], kept - 1
        del self.token_ids[cut:], self.loss_mask[cut:], self.logprobs[cut:]
        del self.pixel_values[kept:], self.image_grid_thw[kept:]
        self.stop_reason = self.stop_reason or "max_tokens"

    def _image_end(self, start: int) -> int:
        """Index just past the <|vision_end|> that closes the image starting at `start`."""
        end = start + 1
        pad = self.token_ids[start + 1] if start + 1 < len(self.token_ids) else None
        while end < len(self.token_ids) and self.token_ids[end] == pad:
            end += 1
        return end + 1

    def to_record(self) -> dict:
        """A JSON-able view (images by number) for trajectory logs."""
        return {
            "example_id": self.example_id, "sample": self.sample, "messages": self.messages,
            "final_answer": self.final_answer, "stop_reason": self.stop_reason, "rewards": self.rewards,
            "turns": [vars(t) for t in self.turns], "tool_calls": [vars(c) for c in self.tool_calls],
            "n_tokens": len(self.token_ids), "n_generated": self.n_generated, "n_images": len(self.images),
            "token_exact": self.token_exact, "protocol": self.protocol,
        }


def template_view(messages: list[dict], images: list[Image.Image] | None = None,
                  protocol: Protocol | None = None) -> list[dict]:
    """The messages as a Qwen chat template renders them, for a chat-turn protocol.

    Assistant turns are their raw text (the protocol's tags are in it already), and tool results
    become user turns wrapped as the protocol says (`qwen_tools`: `<tool_response>`), with their
    images inline. With `images`, each image part carries its PIL image under "image" (for
    chat-level engines).
    """
    protocol = protocol or get_protocol(DEFAULT)
    view = []
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "assistant":
            view.append({"role": "assistant", "content": content})
            continue
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
        if role == "tool":
            role = "user"
            before, after = protocol.wrap_result(message.get("name") if "tool_call_id" in message else None, messages)
            parts = [{"type": "text", "text": before}, *parts, {"type": "text", "text": after}]
        view.append({"role": role, "content": [_template_part(p, images) for p in parts if p["type"] == "image" or p["text"]]})
    return view


def inline_continuation(messages: list[dict], protocol: Protocol) -> str:
    """What an inline protocol appends after the prompt: the assistant's text with each tool result
    written into it (text only: no inline protocol returns images)."""
    out = []
    for message in messages:
        if message["role"] == "assistant":
            out.append(message["content"])
        elif message["role"] == "tool":
            before, after = protocol.wrap_result(message.get("name") if "tool_call_id" in message else None, messages)
            content = message["content"]
            text = content if isinstance(content, str) else "".join(p["text"] for p in content if p["type"] == "text")
            out.append(before + text + after)
    return "".join(out)


def _template_part(part: dict, images: list[Image.Image] | None) -> dict:
    if part["type"] != "image":
        return {"type": "text", "text": part["text"]}
    return {"type": "image"} if images is None else {"type": "image", "image": images[part["image"]]}


def new_trajectory(example_id: str, sample: int, system: str | None, user: list[dict], images: list[Image.Image],
                   token_exact: bool) -> Trajectory:
    """The system prompt (None: none) and the user turn (parts, images numbered 0..); messages only, no tokens yet."""
    head = [{"role": "system", "content": system}] if system is not None else []
    return Trajectory(example_id, sample, messages=[*head, {"role": "user", "content": user}],
                      images=list(images), token_exact=token_exact)


def add_tool_message(traj: Trajectory, text: str, images: list[Image.Image], **fields) -> None:
    """Append a tool message; its images get the next numbers. `fields`: tool_call_id, name (OpenAI schema)."""
    first = len(traj.images)
    parts = [{"type": "text", "text": text}, *({"type": "image", "image": first + i} for i in range(len(images)))]
    traj.messages.append({"role": "tool", **fields, "content": parts})
    traj.images += images


def assistant_turn_ids(tokenizer, text: str, end_id: int, stop_strings: tuple[str, ...] | list[str] = ()) -> list[int]:
    """The tokens of an assistant turn written as text: its canonical tokenization, then end-of-turn.

    Scripted turns (tests, SFT's gold turns) enter trajectories this way, as if a model had
    generated exactly these tokens. A turn that ends with one of `stop_strings` (an inline
    protocol's query) ended there, as generation does: no end-of-turn token follows it.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids if text.endswith(tuple(stop_strings)) and stop_strings else ids + [end_id]


CHATML_END = "<|im_end|>"


def _has_token(tokenizer, token: str) -> bool:
    token_id = tokenizer.convert_tokens_to_ids(token)
    return token_id is not None and token_id != tokenizer.unk_token_id


class TrajectoryBuilder:
    """Grows trajectories with one processor (tokenizer + image processor + chat template), or for a text-only
    policy its tokenizer (an image in its trajectory is a `TextOnlyError`)."""

    def __init__(self, processor, end_of_turn: str | None = None, protocol: Protocol | None = None):
        self.processor = as_processor(processor)  # a text-only policy's tokenizer gets the processor interface
        self.protocol = protocol or get_protocol(DEFAULT)
        self.tokenizer = self.processor.tokenizer
        self.text_only = is_text_only(self.processor)
        # ChatML's <|im_end|> (Qwen); a tokenizer without it ends turns with its own eos (Llama's <|eot_id|>).
        self.end_of_turn = end_of_turn or (CHATML_END if _has_token(self.tokenizer, CHATML_END) else self.tokenizer.eos_token)
        # A text-only policy has no image tokens (Qwen2.5's tokenizer still lists them: they must not count).
        vision = lambda token: None if self.text_only else self.tokenizer.convert_tokens_to_ids(token)
        self.image_token_id = vision("<|image_pad|>")
        self.vision_start_id = vision("<|vision_start|>")
        self.end_of_turn_id = self.tokenizer.convert_tokens_to_ids(self.end_of_turn)

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The template text of `messages`. An inline protocol renders the prompt with the chat template
        (up to the assistant's header) and appends the assistant's one growing message after it."""
        if not self.protocol.inline:
            return self._apply_template(template_view(messages, protocol=self.protocol), add_generation_prompt)
        first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
        prompt = self._apply_template(template_view(messages[:first], protocol=self.protocol), True)
        return prompt + self.protocol.generation_prefix + inline_continuation(messages[first:], self.protocol)

    def _apply_template(self, view: list[dict], add_generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(view, tokenize=False, add_generation_prompt=add_generation_prompt)

    def start(self, example_id: str, sample: int, system: str | None, question: str, images: list[Image.Image],
              token_exact: bool = True) -> Trajectory:
        """A trajectory with the prompt (`system`, and the question in the protocol's user prompt) tokenized."""
        traj = new_trajectory(example_id, sample, system, self.protocol.user_content(question, len(images)), images,
                              token_exact)
        self._append_delta(traj, list(images))
        return traj

    def add_generation(self, traj: Trajectory, token_ids: list[int], logprobs: list[float] | None) -> str:
        """Append generated tokens verbatim (mask 1) and the assistant message; return the turn's text.

        The message's text is the decoded turn without its end-of-turn token, which is how the
        template renders it back, so the rendering stays a prefix of the next one. An inline protocol
        writes its one assistant message raw, so there the message keeps an end-of-turn token the turn
        ended with (a turn that stopped without an action and is answered with an error).
        """
        text = self.tokenizer.decode(token_ids, skip_special_tokens=False)
        traj.token_ids += token_ids
        traj.loss_mask += [1] * len(token_ids)
        traj.logprobs += list(logprobs) if logprobs is not None else [0.0] * len(token_ids)
        traj.rendered += text
        turn = text.removesuffix(self.end_of_turn)
        traj.messages.append({"role": "assistant", "content": text if self.protocol.inline else turn})
        return turn

    def add_tool_response(self, traj: Trajectory, text: str, images: list[Image.Image], **fields) -> int:
        """Append a tool response (with its new images) as the template's delta; return its token count."""
        add_tool_message(traj, text, images, **fields)
        return self._append_delta(traj, images)

    def _append_delta(self, traj: Trajectory, images: list[Image.Image]) -> int:
        if self.text_only and images:
            raise images_refused(len(traj.images))
        if not traj.token_exact:
            return 0
        full = self.render(traj.messages, add_generation_prompt=True)
        if not full.startswith(traj.rendered):
            raise TemplateError(
                "the chat template renders earlier turns differently once a turn is added (does it strip "
                "thinking from past turns?), so token-exact deltas are impossible; use a prefix-stable template"
            )
        delta, traj.rendered = full[len(traj.rendered):], full
        out = self.processor(text=[delta], images=images or None, return_tensors="pt")
        ids = out["input_ids"][0].tolist()
        traj.token_ids += ids
        traj.loss_mask += [0] * len(ids)
        traj.logprobs += [0.0] * len(ids)
        if images:
            grids = out["image_grid_thw"]
            traj.image_grid_thw += grids.tolist()
            traj.pixel_values += list(torch.split(out["pixel_values"], grids.prod(-1).tolist()))
        return len(ids)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def clip_text(self, text: str, max_tokens: int) -> str:
        """`text` cut to `max_tokens` tokens, with a marker saying how much was cut."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_tokens:
            return text
        kept = self.tokenizer.decode(ids[:max_tokens], skip_special_tokens=False)
        return f"{kept} … [truncated {len(ids) - max_tokens} tokens]"
