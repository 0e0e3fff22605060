"""`qwen_tools`, the default protocol: Qwen-style function calling (DESIGN.md).

The system prompt lists the tools as JSON schemas inside `<tools></tools>`. An assistant turn is
`<think>…</think>` followed by exactly one action, either
`<tool_call>{"name": …, "arguments": {…}}</tool_call>` or `<answer>…</answer>`, and ends with the
end-of-turn token. A tool result comes back as a user turn inside `<tool_response>`, its images
inline. Anything else is an invalid action with a message the policy reads back as its observation.
Real Qwen instruct checkpoints start close to it; gold trajectories are stored in it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from mmsearch.model.policy import IMAGE_TOOLS
from mmsearch.protocols.base import Action, Protocol, custom_system_prompt

SYSTEM_PROMPT = """{role}

# Tools

You may call one function per turn to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

# Format

Every turn: think inside <think></think>, then do exactly one action and stop.
- Call a tool: <tool_call>{{"name": <function-name>, "arguments": <args-json-object>}}</tool_call>
- Or give the final answer, as short as possible: <answer>answer</answer>{images}"""
VISUAL_ROLE = "You are a visual search agent. Answer the user's question about the image, using the tools when you need knowledge you cannot see."
TEXT_ROLE = "You are a search agent. Answer the user's question, using the tools when you need knowledge you do not have."
IMAGES = """

Images are numbered in order of appearance: the question's image is 0 and every image a tool returns gets the next number, shown as [image N]. Tools take images by number. Crop boxes are [x1, y1, x2, y2] in pixels of the image as you see it."""

TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>\n", "\n</tool_response>"

_TAG = re.compile(r"<(/?)(think|tool_call|answer)>")


def system_prompt(tool_schemas: list[dict]) -> str:
    """The prompt for these tools; without a tool that takes an image (text search alone, a text-only
    policy) it says nothing about images."""
    visual = any(schema["function"]["name"] in IMAGE_TOOLS for schema in tool_schemas)
    return SYSTEM_PROMPT.format(role=VISUAL_ROLE if visual else TEXT_ROLE, images=IMAGES if visual else "",
                                tools="\n".join(json.dumps(s, ensure_ascii=False) for s in tool_schemas))


@dataclass
class _Span:
    tag: str
    start: int  # index of "<tag>"
    inner_start: int
    inner_end: int = -1  # index of "</tag>"; -1 while unclosed
    end: int = -1  # index after "</tag>"
    children: list = field(default_factory=list)


def _spans(text: str) -> tuple[list[_Span], str]:
    """Top-level tag spans in order, or an error for unbalanced or nested tags."""
    spans: list[_Span] = []
    open_span: _Span | None = None
    for m in _TAG.finditer(text):
        closing, tag = m.group(1) == "/", m.group(2)
        if not closing:
            if open_span is not None:
                return spans, f"<{tag}> opened inside <{open_span.tag}>; close <{open_span.tag}> first"
            open_span = _Span(tag, m.start(), m.end())
        else:
            if open_span is None or open_span.tag != tag:
                return spans, f"</{tag}> without a matching <{tag}>"
            open_span.inner_end, open_span.end = m.start(), m.end()
            spans.append(open_span)
            open_span = None
    if open_span is not None:
        return spans, f"<{open_span.tag}> is never closed with </{open_span.tag}>"
    return spans, ""


def parse_action(text: str) -> Action:
    """Parse the text of one assistant turn (without its end-of-turn token)."""
    spans, error = _spans(text)
    thinks = [s for s in spans if s.tag == "think"]
    thinking = "\n".join(text[s.inner_start:s.inner_end].strip() for s in thinks)
    base = {"thinking": thinking, "has_think": bool(thinks)}
    if error:
        return Action("invalid", error=error, **base)
    actions = [s for s in spans if s.tag != "think"]
    if not actions:
        return Action("invalid", error="no action: end the turn with one <tool_call>…</tool_call> or <answer>…</answer>", **base)
    if len(actions) > 1:
        names = ", ".join(f"<{s.tag}>" for s in actions)
        return Action("invalid", error=f"{len(actions)} actions ({names}); do exactly one action per turn", **base)
    action = actions[0]
    trailing = text[action.end:].strip()
    if trailing:
        return Action("invalid", error=f"text after </{action.tag}> ({trailing[:40]!r}); the action must end the turn", **base)
    inner = text[action.inner_start:action.inner_end].strip()
    if action.tag == "answer":
        if not inner:
            return Action("invalid", error="empty <answer></answer>", **base)
        return Action("answer", answer=inner, **base)
    return _parse_tool_call(inner, base)


def _parse_tool_call(inner: str, base: dict) -> Action:
    try:
        call = json.loads(inner)
    except json.JSONDecodeError as exc:
        return Action("invalid", error=f"the tool call is not valid JSON ({exc.msg} at char {exc.pos})", **base)
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return Action("invalid", error='the tool call must be a JSON object {"name": …, "arguments": {…}}', **base)
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # some models double-encode the arguments, as OpenAI's wire format does
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return Action("invalid", error="the tool call's arguments string is not valid JSON", **base)
    return Action("tool_call", name=call["name"], arguments=arguments, **base)


def format_tool_call(name: str, arguments: dict) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + "</tool_call>"


def format_turn(thinking: str, action: str) -> str:
    """An assistant turn in the protocol's layout (what gold trajectories and scripted policies write)."""
    return f"<think>{thinking}</think>\n{action}"


def tool_prompt_examples(custom_prompt: str = "") -> Iterator[str]:
    """Protocol text for tokenizer training, so its frequent strings become short token sequences; the system
    prompt is `custom_prompt` (`agent.system_prompt`'s template) when the policy is to be served one."""
    from tools.config import ToolsConfig
    from tools.crop import CropTool
    from tools.search_tools import ImageSearchTool, TextSearchTool

    cfg = ToolsConfig()
    tools = [TextSearchTool(None, cfg), ImageSearchTool(None, cfg), CropTool(cfg.vision)]  # schemas only
    schemas = [tool.schema() for tool in tools]
    yield custom_system_prompt(custom_prompt, schemas) if custom_prompt else system_prompt(schemas)
    for tool in ("text_search", "image_search", "crop"):
        yield format_turn("I should look this up.", format_tool_call(tool, {"query": "capital of", "image": 0, "bbox": [0, 0, 10, 10], "k": 5}))
    yield format_turn("The results say so.", "<answer>yes</answer>")


class QwenTools(Protocol):
    name = "qwen_tools"

    def system_prompt(self, tool_schemas: list[dict]) -> str | None:
        return system_prompt(tool_schemas)

    def parse(self, text: str) -> Action:
        return parse_action(text)

    def format_action(self, action: Action) -> str:
        if action.kind == "answer":
            return format_turn(action.thinking, f"<answer>{action.answer}</answer>")
        if action.kind == "tool_call":
            return format_turn(action.thinking, format_tool_call(action.name, action.arguments))
        raise ValueError(f"an {action.kind} action cannot be written: {action.error}")

    def wrap_result(self, tool: str | None, messages: list[dict]) -> tuple[str, str]:
        return TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE
