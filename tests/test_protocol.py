"""The protocol the policy speaks (DESIGN.md): parsing one assistant turn, and the system prompt."""

from __future__ import annotations

import json

import pytest

from mmsearch.protocols.qwen_tools import format_tool_call, format_turn, parse_action, system_prompt

THINK = "<think>The flag is red.</think>\n"
CALL = '<tool_call>{"name": "text_search", "arguments": {"query": "red flag", "k": 3}}</tool_call>'

# (id, text, expected fields of the Action; for invalid ones "error" is a fragment the message must contain)
VALID = [
    ("tool_call", THINK + CALL,
     {"kind": "tool_call", "name": "text_search", "arguments": {"query": "red flag", "k": 3},
      "thinking": "The flag is red.", "has_think": True}),
    ("answer", THINK + "<answer>Ibrovova</answer>",
     {"kind": "answer", "answer": "Ibrovova", "thinking": "The flag is red.", "has_think": True}),
    ("answer_whitespace", "  \n<think>  sure  </think>\n\n<answer>\n  Ibrovova \n</answer>\n\n ",
     {"kind": "answer", "answer": "Ibrovova", "thinking": "sure", "has_think": True}),
    ("no_think", CALL,
     {"kind": "tool_call", "name": "text_search", "thinking": "", "has_think": False}),
    ("no_think_answer", "<answer>42</answer>",
     {"kind": "answer", "answer": "42", "has_think": False}),
    ("double_encoded_arguments",
     THINK + '<tool_call>{"name": "crop", "arguments": "{\\"image\\": 0, \\"bbox\\": [1, 2, 30, 40]}"}</tool_call>',
     {"kind": "tool_call", "name": "crop", "arguments": {"image": 0, "bbox": [1, 2, 30, 40]}}),
    ("missing_arguments", THINK + '<tool_call>{"name": "text_search"}</tool_call>',
     {"kind": "tool_call", "name": "text_search", "arguments": {}}),
    ("unicode_answer", THINK + "<answer>Zürich — 東京 🚩</answer>",
     {"kind": "answer", "answer": "Zürich — 東京 🚩"}),
    ("unicode_arguments", THINK + '<tool_call>{"name": "text_search", "arguments": {"query": "Ålesund 東京"}}</tool_call>',
     {"kind": "tool_call", "arguments": {"query": "Ålesund 東京"}}),
    ("formatted", format_turn("plan", format_tool_call("image_search", {"image": 2})),
     {"kind": "tool_call", "name": "image_search", "arguments": {"image": 2}, "thinking": "plan"}),
]

INVALID = [
    ("no_action", THINK + "The answer is Ibrovova.", "no action", True),
    ("empty_text", "", "no action", False),
    ("two_tool_calls", THINK + CALL + CALL, "2 actions (<tool_call>, <tool_call>)", True),
    ("call_and_answer", THINK + CALL + "\n<answer>x</answer>", "2 actions (<tool_call>, <answer>)", True),
    ("nested", THINK + "<answer><tool_call>{}</tool_call></answer>", "<tool_call> opened inside <answer>", True),
    ("nested_think", "<think>hmm <think>deeper</think></think><answer>x</answer>", "<think> opened inside <think>", False),
    ("unclosed_tool_call", THINK + '<tool_call>{"name": "text_search", "arguments": {"query": "a"}}',
     "<tool_call> is never closed with </tool_call>", True),
    ("stray_close_answer", THINK + "Ibrovova</answer>", "</answer> without a matching <answer>", True),
    ("mismatched_close", THINK + "<answer>x</tool_call>", "</tool_call> without a matching <tool_call>", True),
    ("bad_json", THINK + '<tool_call>{"name": "text_search", "arguments": {"query": }}</tool_call>', "not valid JSON", True),
    ("json_list", THINK + '<tool_call>["text_search", {"query": "a"}]</tool_call>', "must be a JSON object", True),
    ("missing_name", THINK + '<tool_call>{"arguments": {"query": "a"}}</tool_call>', "must be a JSON object", True),
    ("name_not_string", THINK + '<tool_call>{"name": 3, "arguments": {}}</tool_call>', "must be a JSON object", True),
    ("bad_arguments_string", THINK + '<tool_call>{"name": "crop", "arguments": "{image: 0"}</tool_call>',
     "arguments string is not valid JSON", True),
    ("text_after_action", THINK + "<answer>Ibrovova</answer> and that is final",
     "text after </answer> ('and that is final')", True),
    ("text_after_call", THINK + CALL + "\nwaiting", "text after </tool_call> ('waiting')", True),
    ("empty_answer", THINK + "<answer>  \n </answer>", "empty <answer></answer>", True),
]


@pytest.mark.parametrize("text,expected", [v[1:] for v in VALID], ids=[v[0] for v in VALID])
def test_valid_actions(text, expected):
    action = parse_action(text)
    assert action.is_valid and action.error == ""
    for key, value in expected.items():
        assert getattr(action, key) == value, key


@pytest.mark.parametrize("text,fragment,has_think", [v[1:] for v in INVALID], ids=[v[0] for v in INVALID])
def test_invalid_actions(text, fragment, has_think):
    action = parse_action(text)
    assert action.kind == "invalid" and not action.is_valid
    assert fragment in action.error, action.error
    assert action.has_think is has_think
    assert action.name == "" and action.answer == "" and action.arguments is None


def test_bad_json_message_locates_the_error():
    action = parse_action('<tool_call>{"name": "crop", "arguments": {"image": 0,}}</tool_call>')
    assert action.kind == "invalid"
    assert "JSON" in action.error and "at char" in action.error


def test_text_after_action_is_quoted_and_shortened():
    action = parse_action("<answer>x</answer>" + "y" * 100)
    assert "'" + "y" * 40 + "'" in action.error and "y" * 41 not in action.error


def test_thinking_is_kept_for_invalid_turns():
    action = parse_action("<think>first</think><think>second</think>no action here")
    assert action.kind == "invalid" and action.thinking == "first\nsecond" and action.has_think


SCHEMAS = [
    {"type": "function", "function": {"name": name, "description": f"the {name} tool — ünïcode",
                                      "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}
    for name in ("text_search", "image_search", "crop")
]


def test_system_prompt_lists_each_tool_as_json_inside_tools():
    prompt = system_prompt(SCHEMAS)
    inside = prompt.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0]
    lines = inside.split("\n")
    assert [json.loads(line) for line in lines] == SCHEMAS
    for schema in SCHEMAS:
        assert schema["function"]["name"] in inside
    assert "ünïcode" in inside  # not \u-escaped
    # The format section still shows literal braces (str.format must not eat them).
    assert '{"name": <function-name>, "arguments": <args-json-object>}' in prompt


def test_system_prompt_with_the_real_tool_schemas():
    from tools.config import ToolsConfig
    from tools.crop import CropTool
    from tools.search_tools import ImageSearchTool, TextSearchTool

    cfg = ToolsConfig()
    tools = [TextSearchTool(None, cfg), ImageSearchTool(None, cfg), CropTool(cfg.vision)]  # schemas need no backend
    prompt = system_prompt([tool.schema() for tool in tools])
    inside = prompt.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0]
    names = [json.loads(line)["function"]["name"] for line in inside.split("\n")]
    assert names == ["text_search", "image_search", "crop"]
