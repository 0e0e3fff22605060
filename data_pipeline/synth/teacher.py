"""Teacher mode: trajectories from a strong model behind an OpenAI-compatible endpoint, by rejection sampling.

The teacher runs the real agent loop on the real tools, `TeacherConfig.samples` times per question;
the first sample (in sample order) that ends with an answer matching the gold is kept as the
example's trajectory. Its messages are in DESIGN.md's schema, and the images its tools returned
come along so the caller can save them next to the question's own.

An endpoint that cannot be reached is an error (naming its URL), not a question with no trajectory:
a silent run of all-wrong results would look like a weak teacher rather than a dead one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from PIL import Image

from data_pipeline.synth.config import TeacherConfig
from mmsearch.agent.config import AgentConfig
from mmsearch.agent.loop import AgentLoop
from mmsearch.engines.openai_chat import OpenAIChatEngine
from mmsearch.example import Example
from mmsearch.rewards.answer import exact_match, substring_match
from mmsearch.trajectory import Trajectory
from tools.base import Toolbox

MATCHERS = {"exact_match": exact_match, "substring": substring_match}


@dataclass
class TeacherResult:
    messages: list[dict] | None  # the kept trajectory (images by number); None when every sample was wrong
    tool_images: list[Image.Image]  # images its tools returned, numbered from len(example.images) on
    status: str  # correct | all_wrong
    tries: int  # samples looked at: the kept sample's 1-based index, or all of them


def teacher_trajectories(examples: list[Example], cfg: TeacherConfig, toolbox: Toolbox,
                         agent: AgentConfig) -> list[TeacherResult]:
    """One result per example, in order. Raises `OpenAIEngineError` when the endpoint fails."""
    match = _matcher(cfg)
    if not cfg.api_base or not cfg.model:
        raise ValueError("teacher mode needs teacher.api_base and teacher.model (an OpenAI-compatible endpoint)")
    if cfg.samples < 1:
        raise ValueError(f"teacher.samples must be at least 1, got {cfg.samples}")
    if not examples:
        return []
    agent = replace(agent, sampling=replace(agent.sampling, temperature=cfg.temperature))
    with OpenAIChatEngine(api_base=cfg.api_base, model=cfg.model, api_key=cfg.api_key or None) as engine:
        trajectories = AgentLoop(engine, toolbox, builder=None, cfg=agent).run(examples, n_samples=cfg.samples)
    n = cfg.samples  # run() returns trajectories in (example, sample) order
    return [_pick(ex, trajectories[i * n:(i + 1) * n], match) for i, ex in enumerate(examples)]


def _matcher(cfg: TeacherConfig):
    if cfg.match not in MATCHERS:
        raise ValueError(f"unknown teacher.match {cfg.match!r}; choose one of {sorted(MATCHERS)}")
    return MATCHERS[cfg.match]


def _pick(example: Example, samples: list[Trajectory], match) -> TeacherResult:
    for tries, traj in enumerate(samples, start=1):
        # A trajectory with an invalid turn would teach that turn (and its error) to the student.
        clean = all(turn.action != "invalid" for turn in traj.turns)
        if clean and traj.stop_reason == "answered" and match(traj.final_answer, example.answers):
            return TeacherResult(traj.messages, traj.images[len(example.images):], "correct", tries)
    return TeacherResult(None, [], "all_wrong", len(samples))
