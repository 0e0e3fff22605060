"""`scripted` engine: a policy written as a function of the trajectory so far.

Token level (with a tokenizer), it returns each turn as the canonical tokenization of the text the
function writes, followed by the end-of-turn token unless the text ends with a stop string (an inline
protocol's query), exactly as if a model had generated it: tests
use it to check token-exactness on known turns, and SFT replays gold turns through it. Without a
tokenizer it is a chat-level engine that returns the text: gold-trajectory planners use it to
drive the real agent loop and tools without needing any policy's tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable

from mmsearch.engines.base import GenerationOutput, GenerationRequest, SamplingParams
from mmsearch.trajectory import Trajectory, assistant_turn_ids


class ScriptedEngine:
    def __init__(self, tokenizer, write_turn: Callable[[Trajectory], str], end_of_turn: str = "<|im_end|>"):
        self.tokenizer = tokenizer
        self.write_turn = write_turn
        self.token_level = tokenizer is not None
        self.end_id = tokenizer.convert_tokens_to_ids(end_of_turn) if tokenizer is not None else None

    def generate(self, requests: list[GenerationRequest], params: SamplingParams,
                 stop_token_ids: list[int]) -> list[GenerationOutput]:
        outputs = []
        for request in requests:
            if request.trajectory is None:
                raise ValueError("the scripted engine writes turns from the trajectory; pass it in the request")
            ids = assistant_turn_ids(self.tokenizer, self.write_turn(request.trajectory), self.end_id, params.stop_strings)
            limit = request.max_new_tokens or params.max_new_tokens
            finish = "stop" if len(ids) <= limit else "length"
            outputs.append(GenerationOutput(ids[:limit], [0.0] * min(len(ids), limit), finish))
        return outputs

    def chat(self, conversations: list[list[dict]], params: SamplingParams, trajectories: list | None = None) -> list[str]:
        if trajectories is None or len(trajectories) != len(conversations):
            raise ValueError("the scripted engine writes turns from the trajectories; pass one per conversation")
        return [self.write_turn(traj) for traj in trajectories]


def replay(turns_by_example: dict[str, list[str]]) -> Callable[[Trajectory], str]:
    """A write_turn that replays fixed turns per example id (the k-th turn on the k-th call)."""

    def write_turn(traj: Trajectory) -> str:
        turns = turns_by_example[traj.example_id]
        return turns[min(len(traj.turns), len(turns) - 1)]

    return write_turn
