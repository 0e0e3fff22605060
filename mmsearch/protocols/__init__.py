"""The protocols a policy can speak, by name (`agent.protocol=`), and gold trajectories rewritten into them.

Gold trajectories are stored in the default protocol, `qwen_tools`; `convert_messages` rewrites one
into another protocol turn by turn (same actions, same tool results), so SFT data can be rendered in
any protocol from the same dataset.
"""

from __future__ import annotations

from mmsearch.protocols.base import Action, Protocol, ProtocolError
from mmsearch.protocols.mmsearch_r1 import MMSearchR1
from mmsearch.protocols.qwen_tools import QwenTools
from mmsearch.protocols.r1_searcher import R1Searcher
from mmsearch.protocols.search_r1 import SearchR1

DEFAULT = "qwen_tools"
PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (QwenTools(), SearchR1(), R1Searcher(), MMSearchR1())}

__all__ = ["DEFAULT", "PROTOCOLS", "Action", "Protocol", "ProtocolError", "convert_messages", "get_protocol"]


def get_protocol(name: str) -> Protocol:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ProtocolError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}") from None


def convert_messages(messages: list[dict], protocol: Protocol, tool_schemas: list[dict], question: str) -> list[dict]:
    """A gold trajectory stored in `qwen_tools` as `protocol` writes it.

    The system prompt is the protocol's own for `tool_schemas`, the user turn its prompt around
    `question` and the images, every assistant turn the same action in its syntax, and tool
    messages are kept as they are. Raises ProtocolError when a turn uses a tool the protocol has no
    action for, or an action cannot be parsed.
    """
    if protocol.name == DEFAULT:
        return messages
    stored = PROTOCOLS[DEFAULT]
    system = protocol.system_prompt(tool_schemas)
    out = [{"role": "system", "content": system}] if system is not None else []
    for message in messages:
        role = message["role"]
        if role == "system":
            continue
        if role == "user":
            content = message["content"]
            n_images = 0 if isinstance(content, str) else sum(1 for p in content if p.get("type") == "image")
            out.append({**message, "content": protocol.user_content(question, n_images)})
        elif role == "assistant":
            action = stored.parse(message["content"])
            if not action.is_valid:
                raise ProtocolError(f"a gold turn does not parse: {action.error}")
            if action.kind == "tool_call":
                protocol.check_tools([action.name])
            out.append({**message, "content": protocol.format_action(action)})
        else:
            out.append(message)
    return out
