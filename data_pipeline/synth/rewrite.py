"""Optional rewording of synthesized questions by an LLM behind an OpenAI-compatible endpoint.

Template questions read alike; a rewrite varies their wording. A rewrite is accepted only when it
is still one question, of a sane length, that keeps the phrases the question depends on (a
position like "top-left", a relation like "capital") and does not give the answer away. Anything
else keeps the original question, with a status saying why, so the caller can count the outcomes.
Endpoint failures never raise: a question the endpoint could not reword keeps its original text.

Which questions are sent (`RewriteConfig.share`) is the caller's choice; every item given is sent.
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from data_pipeline.synth.config import RewriteConfig
from mmsearch.engines.base import SamplingParams
from mmsearch.engines.openai_chat import OpenAIChatEngine, OpenAIEngineError
from mmsearch.rewards.answer import substring_match

logger = logging.getLogger(__name__)

INSTRUCTION = (
    "Rewrite the question so it asks exactly the same thing in different words. "
    "Do not answer it. Reply with the question only."
)
STATUSES = ("rewritten", "leaks_answer", "drops_term", "empty_or_invalid", "failed")
MAX_GROWTH = 3  # a rewrite longer than this many times the original is rambling, not a rewording
MAX_NEW_TOKENS = 256

_PREFIX = re.compile(r"^(?:rewritten\s+)?question\s*:\s*", re.IGNORECASE)
_QUOTE_PAIRS = {'"': '"', "'": "'", "`": "`", "\u201c": "\u201d", "\u2018": "\u2019", "\u00ab": "\u00bb"}


@dataclass
class RewriteItem:
    question: str
    answers: list[str]  # gold answer and aliases: none may appear in the rewrite
    keep: list[str]  # phrases the rewrite must still contain (case and spacing aside)


@dataclass
class RewriteResult:
    question: str  # the accepted rewrite, or the original for every other status
    status: str  # one of STATUSES


def rewrite_questions(items: list[RewriteItem], cfg: RewriteConfig, seed: int) -> list[RewriteResult]:
    """One result per item, in order. Item i is sampled with seed `seed + i`, so reruns reproduce."""
    if not cfg.api_base or not cfg.model:
        raise ValueError("rewrite needs rewrite.api_base and rewrite.model (an OpenAI-compatible endpoint)")
    if not items:
        return []
    params = SamplingParams(temperature=cfg.temperature, max_new_tokens=MAX_NEW_TOKENS, seed=seed)
    with OpenAIChatEngine(api_base=cfg.api_base, model=cfg.model, api_key=cfg.api_key or None) as engine:
        replies = _ask_each(engine, [_conversation(item.question) for item in items], params)
    failures = [r for r in replies if isinstance(r, OpenAIEngineError)]
    if failures:
        logger.warning("rewrite: %d of %d questions kept their original text because the endpoint failed; "
                       "first error: %s", len(failures), len(items), failures[0])
    return [_judge(item, reply) for item, reply in zip(items, replies)]


def clean_rewrite(text: str) -> str:
    """The reply without surrounding whitespace, quotes and a "Question:" label (in any nesting)."""
    text = text.strip()
    while True:
        before = text
        text = _PREFIX.sub("", text).strip()
        if len(text) >= 2 and _QUOTE_PAIRS.get(text[0]) == text[-1]:
            text = text[1:-1].strip()
        if text == before:
            return text


def _conversation(question: str) -> list[dict]:
    return [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": question}]


def _ask_each(engine: OpenAIChatEngine, conversations: list[list[dict]], params: SamplingParams
              ) -> list[str | OpenAIEngineError]:
    """Each conversation's reply, or the error that ended its retries.

    `chat()` is all-or-nothing for a batch, so one question the endpoint keeps failing on would
    cost every other rewrite; each question goes in its own call instead, concurrently, with the
    seed it would have had in one batch (`chat()` sends conversation i with seed + i).
    """
    def ask(i: int) -> str | OpenAIEngineError:
        try:
            return engine.chat([conversations[i]], replace(params, seed=params.seed + i))[0]
        except OpenAIEngineError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=min(engine.max_concurrency, len(conversations)),
                            thread_name_prefix="rewrite") as pool:
        return list(pool.map(ask, range(len(conversations))))


def _judge(item: RewriteItem, reply: str | OpenAIEngineError) -> RewriteResult:
    if isinstance(reply, OpenAIEngineError):
        return RewriteResult(item.question, "failed")
    text = clean_rewrite(reply)
    status = _problem(item, text)
    return RewriteResult(item.question, status) if status else RewriteResult(text, "rewritten")


def _problem(item: RewriteItem, text: str) -> str:
    """The status that rejects `text` as a rewrite of `item`, or "" when it is acceptable."""
    if not text or "\n" in text or len(text) > MAX_GROWTH * len(item.question) or not text.endswith("?"):
        return "empty_or_invalid"
    if substring_match(text, item.answers):  # whole tokens, as answers are matched: "Parisian" is no leak of "Paris"
        return "leaks_answer"
    folded = _fold(text)
    if any(_fold(phrase) not in folded for phrase in item.keep):
        return "drops_term"
    return ""


def _fold(text: str) -> str:
    return " ".join(text.casefold().split())
