"""What a protocol is: the contract between the policy's text and the agent loop (DESIGN.md).

A protocol fixes five things: the prompt (system and user turn), how one action is parsed from the
policy's text, how an action is written (gold trajectories), how a tool result is written back into
the context, and the strings that end a turn. Everything else (token-exact trajectories, the loss
mask, image positions, the tools) is the same code for every protocol.

Two shapes exist in the papers:
- chat turns (`inline = False`): each assistant turn ends with the end-of-turn token and a tool
  result comes back as a new user turn (Qwen function calling, MMSearch-R1);
- inline (`inline = True`): the policy writes one long assistant message; generation stops at a
  stop string that closes a query (`</search>`), the result is inserted into that same message,
  and generation continues after it (Search-R1, R1-Searcher). Only the answer ends the turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Action:
    """One parsed assistant turn. `kind` is "tool_call", "answer" or "invalid" (then `error` says why)."""

    kind: str
    thinking: str = ""
    name: str = ""
    arguments: Any = None
    answer: str = ""
    error: str = ""
    has_think: bool = False

    @property
    def is_valid(self) -> bool:
        return self.kind != "invalid"


def tool_signatures(tool_schemas: list[dict]) -> str:
    """The tools as `name(argument, ...)`, comma-separated, required arguments first."""
    out = []
    for schema in tool_schemas:
        function = schema["function"]
        params = function.get("parameters", {})
        required = list(params.get("required", []))
        names = required + [name for name in params.get("properties", {}) if name not in required]
        out.append(f"{function['name']}({', '.join(names)})")
    return ", ".join(out)


def custom_system_prompt(template: str, tool_schemas: list[dict]) -> str:
    """A user's system prompt (`agent.system_prompt`), its `{tools}` replaced by the enabled tools'
    signatures; every other brace stays as written, so JSON examples need no escaping."""
    return template.replace("{tools}", tool_signatures(tool_schemas))


def system_prompt_for(protocol: Protocol, template: str, tool_schemas: list[dict]) -> str | None:
    """The system message a loop sends: the user's template (`agent.system_prompt`) or the protocol's own."""
    return custom_system_prompt(template, tool_schemas) if template else protocol.system_prompt(tool_schemas)


class ProtocolError(ValueError):
    """A protocol cannot express what was asked (a tool it has no action for, an engine it cannot use)."""


class Protocol:
    name: str = ""
    # The tools its actions can name; None: any tool the toolbox has (the tools list their own schemas).
    tools: tuple[str, ...] | None = None
    inline: bool = False
    # Strings that end a turn besides the end-of-turn token (inline protocols stop after a query).
    stop_strings: tuple[str, ...] = ()
    # How text_search writes each passage for this protocol's policies (tools.passage_format overrides).
    passage_format: str = "[{rank}] {title}\n{text}\n\n"

    def system_prompt(self, tool_schemas: list[dict]) -> str | None:
        """The system message, or None for a protocol whose prompt is all in the user turn."""
        return None

    # Text the prompt ends with after the assistant's header (R1-Searcher opens `<think>` for the policy).
    generation_prefix: str = ""

    def user_content(self, question: str, n_images: int) -> list[dict]:
        """The user turn for a question with `n_images` images (message-schema parts, images by number)."""
        return [*({"type": "image", "image": i} for i in range(n_images)), {"type": "text", "text": question}]

    def parse(self, text: str) -> Action:
        """One turn's text (without its end-of-turn token) as an action; never raises."""
        raise NotImplementedError

    def format_action(self, action: Action) -> str:
        """An action written as this protocol's policy writes it (gold turns)."""
        raise NotImplementedError

    def wrap_result(self, tool: str | None, messages: list[dict]) -> tuple[str, str]:
        """Text before and after a tool message's content in the context.

        `tool` is the tool that answered, None for the loop's feedback to an invalid action (no tool
        ran); `messages` is the conversation so far (a protocol may restate the question)."""
        raise NotImplementedError

    def invalid_feedback(self, error: str) -> str:
        """The observation after an invalid action."""
        return f"Error: {error}"

    def check_tools(self, names: list[str]) -> None:
        """Refuse a toolbox with tools this protocol has no action for."""
        if self.tools is None:
            return
        extra = [n for n in names if n not in self.tools]
        if extra:
            raise ProtocolError(
                f"protocol {self.name!r} has no action for {', '.join(extra)}; it can call "
                f"{', '.join(self.tools)}: set tools.enabled=[{','.join(n for n in names if n in self.tools) or self.tools[0]}]")


def answer_action(answer: str, thinking: str, has_think: bool) -> Action:
    """An answer action, or an invalid one when the answer tags hold nothing."""
    if not answer:
        return Action("invalid", thinking=thinking, has_think=has_think, error="empty <answer></answer>")
    return Action("answer", thinking=thinking, answer=answer, has_think=has_think)


def thinking_before(text: str, end: int, tags: tuple[str, str] = ("<think>", "</think>")) -> tuple[str, bool]:
    """The reasoning written before position `end` with its tags removed, and whether a tag was there.
    (An inline turn may open its think block in one segment and close it in a later one.)"""
    before = text[:end]
    has_tag = any(tag in before for tag in tags)
    for tag in tags:
        before = before.replace(tag, " ")
    return " ".join(before.split()), has_tag

