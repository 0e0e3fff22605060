"""`rewrite_questions` against a fake OpenAI-compatible endpoint on loopback, replies scripted per question."""

from __future__ import annotations

import functools

import pytest
from fake_openai import FakeChatEndpoint, dead_url, texts

from data_pipeline.synth import rewrite
from data_pipeline.synth.config import RewriteConfig
from data_pipeline.synth.rewrite import INSTRUCTION, RewriteItem, clean_rewrite, rewrite_questions
from mmsearch.engines.openai_chat import OpenAIChatEngine

FLAG = "What is the capital of the country whose flag is top-left?"
RIVER = "Which river flows through the city in the picture?"
BIRDS = "How many birds sit in the top-left corner?"
TOWER = "In which year was the tower in the top-left finished?"
LANDMARK = "Which landmark of this city is shown?"
BROKEN = "Who designed the bridge on the right?"

# Replies keyed by the question they answer; an int is an HTTP status the endpoint fails with every time.
REPLIES = {
    FLAG: "Which city is the capital of the nation with the top-left flag?",
    RIVER: "Which river, the DONAU maybe, runs through the pictured city?",  # an alias, in another case
    BIRDS: "How many birds are sitting in the corner?",
    TOWER: '  "Question: When was the tower at the  Top-Left   completed?"\n',
    LANDMARK: "Which Parisian landmark is in this picture?",  # "Parisian" is not the token "Paris"
    BROKEN: 500,
}
ITEMS = [
    RewriteItem(FLAG, ["Rome"], ["top-left", "capital"]),
    RewriteItem(RIVER, ["Danube", "Donau"], []),
    RewriteItem(BIRDS, ["3", "three"], ["top-left"]),
    RewriteItem(TOWER, ["1889"], ["top-left"]),
    RewriteItem(LANDMARK, ["Paris"], []),
    RewriteItem(BROKEN, ["Eiffel"], ["right"]),
]
EXPECTED = [
    ("Which city is the capital of the nation with the top-left flag?", "rewritten"),
    (RIVER, "leaks_answer"),
    (BIRDS, "drops_term"),
    ("When was the tower at the  Top-Left   completed?", "rewritten"),
    ("Which Parisian landmark is in this picture?", "rewritten"),
    (BROKEN, "failed"),
]

INVALID = {
    "Where is the top-left statue?": "",
    "What does the top-left sign say?": "Sure! Here it is:\nWhat is written on the top-left sign?",
    "Which top-left shop is open?": "Tell me which top-left shop is open.",
    "Top-left colour?": "Could you please tell me, in as much detail as you can, which colour the thing top-left is?",
}


def _reply(body: dict) -> str | int:
    return {**REPLIES, **INVALID}[texts(body["messages"][-1])[-1]]


@pytest.fixture(scope="module")
def fake():
    with FakeChatEndpoint(_reply) as endpoint:
        yield endpoint


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    """The real engine, retrying without the production backoff so the always-failing question is quick."""
    monkeypatch.setattr(rewrite, "OpenAIChatEngine", functools.partial(OpenAIChatEngine, backoff_s=0.01))


def _cfg(fake) -> RewriteConfig:
    return RewriteConfig(api_base=fake.api_base, model="rewriter", temperature=0.3)


def test_statuses_and_texts(fake):
    fake.requests.clear()
    results = rewrite_questions(ITEMS, _cfg(fake), seed=40)
    assert [(r.question, r.status) for r in results] == EXPECTED

    sent = [b for b in fake.requests if texts(b["messages"][-1])[-1] == BROKEN]
    assert len(sent) == 4  # the first try and three retries, then the original is kept
    first = {texts(b["messages"][-1])[-1]: b for b in reversed(fake.requests)}
    for i, item in enumerate(ITEMS):
        body = first[item.question]
        assert body["messages"] == [{"role": "system", "content": INSTRUCTION},
                                    {"role": "user", "content": item.question}]
        assert (body["model"], body["temperature"], body["seed"]) == ("rewriter", 0.3, 40 + i)


def test_invalid_rewrites_keep_the_original(fake):
    items = [RewriteItem(q, ["x"], ["top-left"]) for q in INVALID]
    results = rewrite_questions(items, _cfg(fake), seed=0)
    assert [(r.question, r.status) for r in results] == [(q, "empty_or_invalid") for q in INVALID]


def test_dead_endpoint_keeps_every_original():
    items = ITEMS[:2]
    results = rewrite_questions(items, RewriteConfig(api_base=dead_url(), model="m"), seed=0)
    assert [(r.question, r.status) for r in results] == [(FLAG, "failed"), (RIVER, "failed")]


def test_needs_an_endpoint():
    with pytest.raises(ValueError, match="rewrite.api_base"):
        rewrite_questions(ITEMS, RewriteConfig(), seed=0)


@pytest.mark.parametrize(("reply", "cleaned"), [
    ('"What is it?"', "What is it?"),
    ("Question: What is it?", "What is it?"),
    ("question:   'What is it?'", "What is it?"),
    ('\u201cRewritten question: \u2018What is it?\u2019\u201d', "What is it?"),
    ('"Tom" said what?', '"Tom" said what?'),  # quotes that do not enclose the reply stay
])
def test_clean_rewrite(reply, cleaned):
    assert clean_rewrite(reply) == cleaned
