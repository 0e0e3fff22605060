"""Teacher mode: the real agent loop and crop tool, driven by a fake teacher endpoint on loopback.

The fake plays the protocol: its first turn crops image 0, its second answers. It tells samples
apart by arrival order of their first turns (the engine is given one connection, so a batch
arrives in the order the loop sends it: example by example, sample by sample), writes the sample
number into that first turn, and reads it back from the history to pick the scripted answer.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from fake_openai import FakeChatEndpoint, dead_url, n_images, texts
from PIL import Image

from data_pipeline.synth import teacher
from data_pipeline.synth.config import TeacherConfig
from data_pipeline.synth.teacher import teacher_trajectories
from mmsearch.agent.config import AgentConfig
from mmsearch.engines.openai_chat import OpenAIChatEngine, OpenAIEngineError
from mmsearch.example import Example
from mmsearch.protocols.qwen_tools import format_tool_call, format_turn
from tools.config import ToolsConfig
from tools.registry import build_toolbox

CROP_BOX = [0, 0, 20, 20]  # seen pixels; the images below are sizes the processor keeps, so also original pixels
CROP = format_tool_call("crop", {"image": 0, "bbox": CROP_BOX})
A, B = "Which city is shown top-left?", "Which river is this?"
ANSWERS = {  # per question, the answer each sample gives
    A: ["the city of Paris", "paris", "Paris", "Lyon"],
    B: ["Rhine", "Rhone", "Seine", "Loire"],
}
GOLD = {A: ["Paris", "Paname"], B: ["Danube"]}


class TeacherScript:
    def __init__(self):
        self.first_turns: Counter[str] = Counter()

    def __call__(self, body: dict) -> str:
        messages = body["messages"]
        question = texts(messages[1])[-1]
        earlier = [m["content"] for m in messages if m["role"] == "assistant"]
        if not earlier:
            sample = self.first_turns[question]
            self.first_turns[question] += 1
            return format_turn(f"sample {sample}: the top-left corner needs a closer look.", CROP)
        sample = int(re.match(r"<think>sample (\d+):", earlier[0]).group(1))
        assert n_images(body) == 2  # the question's image and the crop
        return format_turn("The crop settles it.", f"<answer>{ANSWERS[question][sample]}</answer>")


@pytest.fixture()
def fake():
    with FakeChatEndpoint(TeacherScript()) as endpoint:
        yield endpoint


@pytest.fixture(autouse=True)
def one_connection(monkeypatch):
    """The real engine with one request in flight, so the fake sees samples in the loop's order."""
    monkeypatch.setattr(teacher, "OpenAIChatEngine",
                        functools.partial(OpenAIChatEngine, max_concurrency=1, backoff_s=0.01))


@pytest.fixture(scope="module")
def toolbox():
    return build_toolbox(ToolsConfig(enabled=["crop"]), None)


def _image(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(84, 112, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def _examples() -> list[Example]:
    return [Example("a", A, [_image(0)], GOLD[A]), Example("b", B, [_image(1)], GOLD[B])]


def _cfg(fake, match: str = "exact_match") -> TeacherConfig:
    return TeacherConfig(api_base=fake.api_base, model="teacher", samples=4, temperature=0.6, match=match)


def test_keeps_first_correct_sample(fake, toolbox):
    examples, agent = _examples(), AgentConfig()
    a, b = teacher_trajectories(examples, _cfg(fake), toolbox, agent)

    assert (a.status, a.tries) == ("correct", 2)  # sample 0 says more than the answer; sample 1 is the first match
    roles = [m["role"] for m in a.messages]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]
    assert a.messages[2]["content"].startswith("<think>sample 1:")
    assert a.messages[2]["tool_calls"][0]["function"]["name"] == "crop"
    assert a.messages[3]["content"][1] == {"type": "image", "image": 1}
    assert "-> [image 1]" in a.messages[3]["content"][0]["text"]
    assert a.messages[4]["content"].endswith("<answer>paris</answer>")
    [crop] = a.tool_images
    assert crop.size == (20, 20)
    assert np.array_equal(np.asarray(crop), np.asarray(examples[0].images[0].crop((0, 0, 20, 20))))

    assert (b.status, b.tries, b.messages, b.tool_images) == ("all_wrong", 4, None, [])

    assert {r["temperature"] for r in fake.requests} == {0.6}
    assert agent.sampling.temperature == AgentConfig().sampling.temperature  # the caller's config is untouched
    assert len(fake.requests) == 2 * 4 * 2  # two examples, four samples, two turns each


def test_substring_match_accepts_a_longer_answer(fake, toolbox):
    a, b = teacher_trajectories(_examples(), _cfg(fake, "substring"), toolbox, AgentConfig())
    assert (a.status, a.tries) == ("correct", 1)
    assert a.messages[-1]["content"].endswith("<answer>the city of Paris</answer>")
    assert b.status == "all_wrong"


def test_only_answered_trajectories_count(fake, toolbox):
    """A sample cut off before it answers is not kept, whatever it was going to say."""
    one_turn = replace(AgentConfig(), max_turns=1)
    results = teacher_trajectories(_examples(), _cfg(fake), toolbox, one_turn)
    assert [(r.status, r.tries) for r in results] == [("all_wrong", 4), ("all_wrong", 4)]


def test_dead_endpoint_raises_naming_it(toolbox):
    url = dead_url()
    cfg = TeacherConfig(api_base=url, model="teacher", samples=2)
    with pytest.raises(OpenAIEngineError, match="ConnectError") as err:
        teacher_trajectories(_examples(), cfg, toolbox, AgentConfig())
    assert url in str(err.value)


@pytest.mark.parametrize(("cfg", "message"), [
    (TeacherConfig(api_base="http://127.0.0.1:9/v1", model="t", match="f1"), "unknown teacher.match 'f1'"),
    (TeacherConfig(api_base="http://127.0.0.1:9/v1", model="t", samples=0), "samples must be at least 1"),
    (TeacherConfig(model="t"), "teacher.api_base"),
])
def test_bad_config(toolbox, cfg, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        teacher_trajectories(_examples(), cfg, toolbox, AgentConfig())
