"""The rules a candidate must pass before (and after) its gold trajectory runs, each with a drop reason."""

from __future__ import annotations

import re
from pathlib import Path

from data_pipeline.synth.config import FilterConfig
from data_pipeline.synth.questions import Candidate
from data_pipeline.synth.records import FileHashes
from mmsearch.rewards.answer import normalize_answer


def dedup_key(question: str, images: list[Path], hashes: FileHashes) -> str:
    return "|".join([normalize_answer(question), *(hashes.of(p) for p in images)])


def answer_in_question(question: str, answers: list[str]) -> bool:
    """Whether any answer alias appears in the question as whole words (after answer normalisation)."""
    q = f" {normalize_answer(question)} "
    return any(a and re.search(rf"(?<!\S){re.escape(a)}(?!\S)", q) for a in map(normalize_answer, answers))


class HeldOutNames:
    """Whole-word matcher for the names and aliases of held-out (validation and test) entities.

    A training row's tool results come from searching the whole KB, so they can show a held-out
    entity's text (an image match, a passage listing people born in a city); such a row would put
    held-out text into training, and is dropped.
    """

    def __init__(self, names: list[str]):
        names = sorted({n for n in names if n.strip()}, key=len, reverse=True)
        self.pattern = re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, names)) + r")(?!\w)", re.IGNORECASE) if names else None

    def find(self, text: str) -> str | None:
        found = self.pattern.search(text) if self.pattern else None
        return found.group(0) if found else None


def message_texts(messages: list[dict]):
    """Every text of a message list (string contents and the text parts of multimodal ones)."""
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):
            yield from (part["text"] for part in content if isinstance(part, dict) and part.get("text"))


def filter_reason(candidate: Candidate, cfg: FilterConfig) -> str | None:
    """Why the candidate is dropped before its trajectory runs, or None. (Duplicates are dropped when
    an example is accepted, so only accepted examples decide what counts as seen.)"""
    if cfg.answer_in_question and answer_in_question(candidate.question, candidate.answers):
        return "filter: answer in question"
    if len(candidate.steps) > cfg.max_tool_calls:
        return "filter: too many tool calls"
    return None
