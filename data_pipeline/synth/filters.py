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


def filter_reason(candidate: Candidate, cfg: FilterConfig) -> str | None:
    """Why the candidate is dropped before its trajectory runs, or None. (Duplicates are dropped when
    an example is accepted, so only accepted examples decide what counts as seen.)"""
    if cfg.answer_in_question and answer_in_question(candidate.question, candidate.answers):
        return "filter: answer in question"
    if len(candidate.steps) > cfg.max_tool_calls:
        return "filter: too many tool calls"
    return None
