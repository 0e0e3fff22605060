"""Gold trajectories: a planner that knows the answer path drives the real agent loop and tools.

The planner is a `write_turn` for the chat-level scripted engine: each turn it comments on the last
tool result (naming the best image match, quoting the sentence that holds the fact), says what it
needs next, and calls the next tool of the candidate's path, or answers. The tools are the
policy's own (in-process or through the server), so results are what the policy will see, and
`check_evidence` keeps an example only if every hop's evidence really appeared in them.

With `gold.think: terse` (what the tiny policy trains on) a turn is a few-word thought and its
action, each query is the relation's one canonical form with the name the last result showed, and
the calls ask for few results (`gold.image_k`, `gold.text_k`), so there is little besides the
action's own words to learn and the tool results stay short.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from data_pipeline.synth import templates as T
from data_pipeline.synth.config import GoldConfig
from data_pipeline.synth.questions import Candidate, Step
from mmsearch.protocols.qwen_tools import format_tool_call, format_turn
from mmsearch.trajectory import Trajectory

_BLOCK = re.compile(r"^\[(\d+)\] ", re.MULTILINE)
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def result_blocks(text: str) -> list[tuple[int, str]]:
    """(rank, block text) for each hit of a search tool's result."""
    starts = [(m.start(), int(m.group(1))) for m in _BLOCK.finditer(text)]
    return [(rank, text[start:(starts[i + 1][0] if i + 1 < len(starts) else len(text))].strip())
            for i, (start, rank) in enumerate(starts)]


def mentions(text: str, names: list[str]) -> str | None:
    """The first of `names` that occurs in `text` as whole words (case-insensitive)."""
    for name in names:
        if re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text, re.IGNORECASE):
            return name
    return None


def find_evidence(step: Step, result: str, top_k: int) -> tuple[int, str] | None:
    """(rank, the block or sentence that shows the step's evidence), or None when the result lacks it."""
    for rank, block in result_blocks(result):
        if step.tool == "image_search":
            if rank <= top_k and mentions(block, step.evidence):
                return rank, block.split("\n", 1)[0].split("] ", 1)[1]
        elif mentions(block, step.subject) and mentions(block, step.evidence):
            body = block.split("\n", 1)[-1].replace("\n", " ")  # the passage without its "[rank] title" line
            return rank, next((s for s in _SENTENCE.split(body) if mentions(s, step.evidence)), body).strip()
    return None


def check_evidence(candidate: Candidate, traj: Trajectory, top_k: int) -> str | None:
    """Why the trajectory does not support the answer (a drop reason), or None when every hop's evidence is there."""
    if len(traj.tool_calls) != len(candidate.steps):
        return f"gold path ran {len(traj.tool_calls)} of {len(candidate.steps)} tool calls ({traj.stop_reason})"
    for hop, (step, call) in enumerate(zip(candidate.steps, traj.tool_calls)):
        if call.is_error:
            return f"{step.tool} returned an error"
        if step.tool == "image_search" and find_evidence(step, call.result, top_k) is None:
            return f"image_search: pictured entity not in the top {top_k}"
        if step.tool == "text_search" and find_evidence(step, call.result, top_k) is None:
            return f"text_search hop {hop}: evidence not in the results"
    if traj.stop_reason != "answered" or traj.final_answer != candidate.answers[0]:
        return f"gold path did not end with the answer ({traj.stop_reason})"
    return None


def gold_writer(candidates: dict[str, Candidate], top_k: int, gold: GoldConfig | None = None
                ) -> Callable[[Trajectory], str]:
    """The scripted policy: example id -> its candidate's next turn."""
    gold = gold or GoldConfig()
    if gold.think not in ("full", "terse"):
        raise ValueError(f"gold.think must be full or terse, got {gold.think!r}")

    def write_turn(traj: Trajectory) -> str:
        candidate = candidates[traj.example_id]
        turn = len(traj.turns)
        answer = f"<answer>{' ' if gold.names_after_space else ''}{candidate.answers[0]}</answer>"
        if gold.think == "terse":
            if turn < len(candidate.steps):
                step = candidate.steps[turn]
                return format_turn(_terse_intent(candidate, step), format_tool_call(step.tool, _arguments(step, gold)))
            return format_turn("answer", answer)
        if not candidate.category.requires_search and turn >= len(candidate.steps):
            return format_turn(candidate.explanation, answer)  # search-free: from the image (or the crop) itself
        said = _comment(candidate.steps[turn - 1], traj.tool_calls[-1].result, top_k) if turn else ""
        if turn < len(candidate.steps):
            step = candidate.steps[turn]
            return format_turn(_join(said, _intent(candidate, step)), format_tool_call(step.tool, _arguments(step, gold)))
        return format_turn(_join(said, f"So the answer is {candidate.answers[0]}."), answer)

    return write_turn


def _arguments(step: Step, gold: GoldConfig) -> dict:
    """The step's tool arguments as the gold turn writes them: terse queries take one canonical form."""
    arguments = dict(step.arguments)
    if step.tool == "text_search":
        if gold.think == "terse" and not step.describes:  # a description's query is one form already
            arguments["query"] = T.canonical_query(step.relation, step.subject[0], step.fact, gold.names_after_space)
        if gold.text_k:
            arguments["k"] = gold.text_k
    if step.tool == "image_search" and gold.image_k:
        arguments["k"] = gold.image_k
    return arguments


def _terse_intent(candidate: Candidate, step: Step) -> str:
    """The thought's first word is the decision (crop / search / answer): one token for a small policy to choose."""
    if step.tool == "crop":
        return f"crop {candidate.meta['position']}"
    return "search image" if step.tool == "image_search" else "search text"


def _intent(candidate: Candidate, step: Step) -> str:
    meta = candidate.meta
    noun = T.PICTURE_NOUN.get(candidate.kind, "picture")
    if step.tool == "crop":
        purpose = "look it up" if candidate.category.requires_search else "see it closely"
        return f"The question is about the {noun} {T.at_position(meta['position'])}. I will crop it to {purpose}."
    if step.tool == "image_search":
        which = "the crop" if meta.get("view") == "crop" else f"this {noun}"
        return f"I will search for images like {which} to find out which {T.kind_noun(candidate.kind)} it is."
    subject, relation = step.subject[0], step.relation
    if step.describes:
        need = f"I need to find {meta['description']['np']}."
    elif step.fact:
        need = f"I need to find out: {T.fact_questions(relation)[0].format(x=subject)}"
    else:
        need = f"I need {T.relation_nps(relation)[0].format(x=subject)}."
    return f"{need} I search for {json.dumps(step.arguments['query'], ensure_ascii=False)}."


def _comment(step: Step, result: str, top_k: int) -> str:
    if step.tool == "crop":
        return "Here is the crop."
    found = find_evidence(step, result, top_k)
    if found is None:
        return "The results do not show it."
    rank, text = found
    if step.tool == "image_search":
        return f"The best match is \"{text}\", so this is {step.subject[0]}."
    if step.describes:
        return f"Result [{rank}] says: \"{text}\" So it is {step.evidence[0]}."
    return f"Result [{rank}] says: \"{text}\""


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)
