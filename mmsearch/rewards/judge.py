"""An LLM judge of answer correctness, through any OpenAI-compatible chat endpoint (vLLM, OpenAI, ...).

String matching misses correct answers phrased differently from every alias ("the 16th president"
for "Abraham Lincoln"); a judge model catches those. It is text-only: it sees the question, the gold
answers and the prediction, never the image.

A judge failure must not crash a rollout or an epoch: a dead endpoint, an HTTP error or a reply with
no verdict scores `judge` = 0.0 with `judge_error` = 1.0 and a logged warning, so a run can report
how many verdicts it lost.

Two rewards use it. "judge" always asks the endpoint (and is a config error without one).
"answer_or_judge" writes one `correct` component whichever way it is decided: by the judge when
`judge.api_base` is set, by exact match otherwise, so one recipe (DeepMMSearch-R1's judged answer
reward, or Search-R1's exact match) runs offline and against a judge without renaming a weight.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx

from mmsearch.rewards.answer import exact_match
from mmsearch.rewards.registry import register_reward

if TYPE_CHECKING:
    from mmsearch.example import Example
    from mmsearch.rewards.combine import RewardConfig
    from mmsearch.trajectory import Trajectory

logger = logging.getLogger(__name__)


@dataclass
class JudgeConfig:
    api_base: str = ""  # e.g. http://localhost:8000/v1 ; empty: no judge
    model: str = ""
    api_key: str = ""  # empty: read the environment variable named by api_key_env (none needed for local vLLM)
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 30.0
    retries: int = 2  # after the first attempt, on connection errors, timeouts, 429 and 5xx
    backoff_s: float = 0.5  # doubled after each retry
    max_tokens: int = 256  # room for reasoning models that think before the verdict
    concurrency: int = 16  # parallel requests in compute_rewards_batch


SYSTEM = (
    "You grade answers to questions. Given a question, the accepted gold answers (aliases of one answer) "
    "and a predicted answer, decide whether the prediction means the same as a gold answer. Differences "
    "in wording, spelling, formatting, accents or extra context that does not contradict the gold are "
    "fine; a different entity, a wrong number, a hedge between several answers or no answer is not. "
    "Reply with exactly one word: CORRECT or INCORRECT."
)

# The last verdict word wins, so a model that reasons before answering is read right; "not correct"
# is matched whole so that it never reads as CORRECT.
_VERDICT = re.compile(r"\b(incorrect|not\s+correct|correct)\b", re.IGNORECASE)
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)


class JudgeError(RuntimeError):
    """No verdict could be had from the judge endpoint."""


_client: httpx.Client | None = None
_client_lock = threading.Lock()


def _http() -> httpx.Client:
    """One pooled client for the process: httpx clients are thread-safe and keep connections alive."""
    global _client
    with _client_lock:
        if _client is None:
            _client = httpx.Client(limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))
        return _client


def judge_prompt(question: str, golds: list[str], prediction: str) -> str:
    # JSON-quoted, so answers with newlines or quotes cannot blur where one ends.
    return (
        f"Question: {question}\n"
        f"Gold answers: {json.dumps(list(golds), ensure_ascii=False)}\n"
        f"Predicted answer: {json.dumps(prediction, ensure_ascii=False)}\n"
        "Verdict (CORRECT or INCORRECT):"
    )


def parse_verdict(text: str) -> bool | None:
    """True for CORRECT, False for INCORRECT, None when the reply holds no verdict."""
    matches = _VERDICT.findall(_THINK.sub(" ", text))
    return matches[-1].lower() == "correct" if matches else None


def check_judge_config(cfg: JudgeConfig) -> None:
    """A judge without an endpoint or a model is a config error: raised before any rollout is scored."""
    if not cfg.api_base:
        raise ValueError("the 'judge' reward needs an endpoint: set judge.api_base (an OpenAI-compatible .../v1 URL)")
    if not cfg.model:
        raise ValueError("the 'judge' reward needs a model: set judge.model to a model the endpoint serves")


def uses_judge(cfg: RewardConfig) -> bool:
    """Whether scoring under `cfg` sends requests to the judge endpoint."""
    return "judge" in cfg.functions or ("answer_or_judge" in cfg.functions and bool(cfg.judge.api_base))


def ask_judge(cfg: JudgeConfig, question: str, golds: list[str], prediction: str) -> bool:
    """The endpoint's verdict; raises `JudgeError` when none could be had."""
    check_judge_config(cfg)
    api_key = cfg.api_key or os.environ.get(cfg.api_key_env, "")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    payload = {
        "model": cfg.model,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": judge_prompt(question, golds, prediction)},
        ],
        "temperature": 0.0,
        "max_tokens": cfg.max_tokens,
    }
    url = cfg.api_base.rstrip("/") + "/chat/completions"
    errors: list[str] = []
    for attempt in range(cfg.retries + 1):
        if attempt:
            time.sleep(cfg.backoff_s * 2 ** (attempt - 1))
        try:
            resp = _http().post(url, json=payload, headers=headers, timeout=cfg.timeout_s)
        except httpx.TransportError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            continue
        if resp.status_code == 429 or resp.status_code >= 500:
            errors.append(f"HTTP {resp.status_code}")
            continue
        if resp.status_code >= 400:  # a bad model name or key: retrying cannot help
            raise JudgeError(f"{url} answered HTTP {resp.status_code}: {resp.text[:200]}")
        try:
            content = resp.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(f"{url} answered something that is not a chat completion: {resp.text[:200]}") from None
        verdict = parse_verdict(content) if isinstance(content, str) else None
        if verdict is None:
            raise JudgeError(f"the judge's reply holds no CORRECT/INCORRECT verdict: {str(content)[:200]!r}")
        return verdict
    raise JudgeError(f"{url} failed after {cfg.retries + 1} attempt(s): {'; '.join(errors)}")


@register_reward("judge", requires=("answers",))
def judge_reward(trajectory: Trajectory, example: Example, cfg: RewardConfig | None = None) -> dict[str, float]:
    """`judge`: 1.0 when the judge model calls the final answer correct; `judge_error`: 1.0 when it could not say."""
    judge_cfg = cfg.judge if cfg is not None else JudgeConfig()
    check_judge_config(judge_cfg)
    if trajectory.final_answer is None:
        return {"judge": 0.0, "judge_error": 0.0}
    correct, error = _verdict(judge_cfg, trajectory, example)
    return {"judge": correct, "judge_error": error}


def _verdict(judge_cfg: JudgeConfig, trajectory: Trajectory, example: Example) -> tuple[float, float]:
    """(correct, judge_error) for the trajectory's final answer; a lost verdict scores 0 and is counted."""
    try:
        return float(ask_judge(judge_cfg, example.question, example.answers, trajectory.final_answer)), 0.0
    except JudgeError as exc:
        logger.warning("judge failed on %s/%d, scored 0: %s", trajectory.example_id, trajectory.sample, exc)
        return 0.0, 1.0


@register_reward("answer_or_judge", requires=("answers",))
def answer_or_judge_reward(trajectory: Trajectory, example: Example, cfg: RewardConfig | None = None) -> dict[str, float]:
    """`correct`: 1.0 when the final answer is right, judged when `judge.api_base` is set, by exact match otherwise;
    `judge_error`: 1.0 when the judge was asked and could not say (always 0.0 offline).

    An exact match of the gold or an alias is right without asking: no judge should overrule it, and it
    saves the request. So the judge only sees answers exact match rejects, and a lost verdict scores 0,
    which is what exact match said.
    """
    judge_cfg = cfg.judge if cfg is not None else JudgeConfig()
    if judge_cfg.api_base:
        check_judge_config(judge_cfg)  # an endpoint without a model is a config error, not a silent fallback
    if trajectory.final_answer is None:
        return {"correct": 0.0, "judge_error": 0.0}
    matched = exact_match(trajectory.final_answer, example.answers)
    if matched == 1.0 or not judge_cfg.api_base:
        return {"correct": matched, "judge_error": 0.0}
    correct, error = _verdict(judge_cfg, trajectory, example)
    return {"correct": correct, "judge_error": error}
