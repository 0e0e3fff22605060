"""The agent loop: many trajectories advance together, one batched engine call per turn.

Every active trajectory generates its next turn in one engine call; the turn is parsed into an
action; all tool calls of the turn run as one Toolbox batch (each tool's calls fused, tools
concurrent, in-process or through the server client); responses are appended as template deltas;
finished trajectories leave the batch. Nothing a policy writes can crash the loop (invariant 5).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from mmsearch.agent.config import AgentConfig
from mmsearch.engines.base import GenerationRequest, SamplingParams
from mmsearch.example import Example
from mmsearch.protocols import Action, ProtocolError, get_protocol
from mmsearch.protocols.base import system_prompt_for
from mmsearch.trajectory import (
    ToolCallRecord,
    Trajectory,
    TrajectoryBuilder,
    TurnRecord,
    add_tool_message,
    new_trajectory,
    template_view,
)
from tools.base import Toolbox, ToolCall, ToolContext, ToolResult

# on_event(trajectory, kind, payload): "turn" (TurnRecord), "tool" (ToolCallRecord), "done" (None)
EventHook = Callable[[Trajectory, str, object], None]


@dataclass
class Timings:
    """Where rollout wall time goes (the benchmark reports the shares)."""

    generate_s: float = 0.0
    tools_s: float = 0.0
    total_s: float = 0.0
    engine_calls: int = 0

    @property
    def bookkeeping_s(self) -> float:
        return max(0.0, self.total_s - self.generate_s - self.tools_s)


class AgentLoop:
    def __init__(self, engine, toolbox: Toolbox, builder: TrajectoryBuilder | None, cfg: AgentConfig,
                 on_event: EventHook | None = None):
        if engine.token_level and builder is None:
            raise ValueError("a token-level engine needs a TrajectoryBuilder (the policy's processor)")
        self.engine, self.toolbox, self.builder, self.cfg = engine, toolbox, builder, cfg
        self.on_event = on_event or (lambda traj, kind, payload: None)
        self.protocol = get_protocol(cfg.protocol)
        self.protocol.check_tools(list(toolbox.tools))
        if builder is not None and builder.protocol.name != self.protocol.name:
            raise ProtocolError(f"the trajectory builder renders {builder.protocol.name!r} but the loop speaks {self.protocol.name!r}")
        if self.protocol.inline and not engine.token_level:
            raise ProtocolError(f"protocol {self.protocol.name!r} continues the assistant's own message after each "
                                "result, which a chat-level engine cannot do; use engine.kind=hf or vllm")
        self.system = system_prompt_for(self.protocol, cfg.system_prompt, toolbox.schemas())
        self.timings = Timings()
        self.stop_token_ids: list[int] = []
        self.suppress_token_ids: list[int] = []
        if builder is not None:
            tok = builder.tokenizer
            stops = {builder.end_of_turn_id, tok.eos_token_id}
            self.stop_token_ids = sorted(t for t in stops if t is not None and t != tok.unk_token_id)
            vision = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")
            self.suppress_token_ids = sorted({i for i in tok.convert_tokens_to_ids(list(vision))
                                              if i is not None and i != tok.unk_token_id})

    def run(self, examples: list[Example], n_samples: int = 1) -> list[Trajectory]:
        """Roll out every example `n_samples` times; trajectories in (example, sample) order."""
        self._reset_engine()
        try:
            return self._run(examples, n_samples)
        finally:
            self._reset_engine()

    def _reset_engine(self) -> None:
        """Engines that keep state between turns (the hf engine's KV cache) start and end every run empty:
        nothing cached under earlier weights is reused, and the memory is free for training."""
        reset = getattr(self.engine, "reset", None)
        if reset is not None:
            reset()

    def _run(self, examples: list[Example], n_samples: int) -> list[Trajectory]:
        start = time.perf_counter()
        trajectories = [self._start(ex, s) for ex in examples for s in range(n_samples)]
        for traj in trajectories:
            if traj.done:  # the prompt alone exceeds max_total_tokens; hooks still see every trajectory end
                self.on_event(traj, "done", None)
        active = [t for t in trajectories if not t.done]
        turn = 0
        while active:
            turns = self._generate(active, turn)
            pending = [self._take_turn(traj, *generated) for traj, generated in zip(active, turns)]
            self._run_tools([p for p in pending if p is not None])
            for traj in active:
                if not traj.done and self._budget(traj) <= 0:
                    traj.stop_reason = "max_tokens"
                if traj.done:
                    self.on_event(traj, "done", None)
            active = [t for t in active if not t.done]
            turn += 1
        self.timings.total_s += time.perf_counter() - start
        return trajectories

    # -- one turn ---------------------------------------------------------------------------

    def _start(self, example: Example, sample: int) -> Trajectory:
        token_exact = bool(self.engine.token_level)
        if self.builder is not None:
            traj = self.builder.start(example.id, sample, self.system, example.question, example.images, token_exact)
        else:
            traj = new_trajectory(example.id, sample, self.system,
                                  self.protocol.user_content(example.question, len(example.images)), example.images, token_exact)
        traj.protocol = self.protocol.name
        if token_exact and len(traj.token_ids) >= self.cfg.max_total_tokens:
            traj.truncate(self.cfg.max_total_tokens, self.builder.vision_start_id)
        return traj

    def _budget(self, traj: Trajectory) -> int:
        cfg = self.cfg
        left = min(cfg.max_new_tokens_per_turn, cfg.max_new_tokens_per_trajectory - traj.n_generated)
        if traj.token_exact:
            left = min(left, cfg.max_total_tokens - len(traj.token_ids))
        return left

    def _generate(self, active: list[Trajectory], turn: int) -> list[tuple[str, str, int]]:
        """(turn text, finish reason, token count) for every active trajectory, from one batched engine call."""
        s = self.cfg.sampling
        params = SamplingParams(s.temperature, s.top_p, s.top_k, self.cfg.max_new_tokens_per_turn,
                                seed=None if s.seed is None else s.seed + turn,
                                suppress_token_ids=self.suppress_token_ids, stop_strings=list(self.protocol.stop_strings))
        t0 = time.perf_counter()
        if self.engine.token_level:
            requests = [GenerationRequest(t.token_ids, t.images, t.pixel_tensor(), t.grid_tensor(), self._budget(t), t)
                        for t in active]
            outputs = self.engine.generate(requests, params, self.stop_token_ids)
            texts = []
            for traj, out in zip(active, outputs):
                text = self.builder.add_generation(traj, out.token_ids, out.logprobs)
                texts.append((text, out.finish_reason, len(out.token_ids)))
        else:
            budgets = [self._budget(t) for t in active]
            params.max_new_tokens = max(budgets)
            replies = self.engine.chat([template_view(t.messages, t.images, self.protocol) for t in active], params,
                                       trajectories=active)
            texts = []
            for traj, reply in zip(active, replies):
                traj.messages.append({"role": "assistant", "content": reply})
                texts.append((reply, "stop", 0))
        self.timings.generate_s += time.perf_counter() - t0
        self.timings.engine_calls += 1
        return texts

    def _take_turn(self, traj: Trajectory, text: str, finish: str, n_tokens: int
                   ) -> tuple[Trajectory, ToolCall, ToolCallRecord] | None:
        """Record the turn; return the tool call to run, or None when the turn needs no tool."""
        action = self.protocol.parse(text)
        if finish == "length" and not action.is_valid:
            action = Action("invalid", thinking=action.thinking, has_think=action.has_think,
                            error=f"the turn hit the token limit before its action was complete ({action.error})")
        if action.kind == "tool_call" and action.name not in self.toolbox.tools:
            action = Action("invalid", thinking=action.thinking, has_think=action.has_think,
                            error=f"unknown tool {action.name!r}; available tools: {', '.join(self.toolbox.tools)}")
        record = TurnRecord(text=text, action=action.kind, error=action.error, has_think=action.has_think,
                            n_tokens=n_tokens, finish_reason=finish)
        traj.turns.append(record)
        call_id = f"call_{len(traj.turns) - 1}"
        if action.kind == "tool_call":
            traj.messages[-1]["tool_calls"] = [{"id": call_id, "type": "function", "function": {
                "name": action.name, "arguments": json.dumps(action.arguments, ensure_ascii=False)}}]
        self.on_event(traj, "turn", record)

        if action.kind == "answer":
            traj.final_answer, traj.stop_reason = action.answer, "answered"
            return None
        if self._out_of_budget(traj):
            return None
        if action.kind == "invalid":
            traj.invalid_streak += 1
            if traj.invalid_streak >= self.cfg.max_invalid_streak:
                traj.stop_reason = "invalid_actions"
                return None
            feedback = self.protocol.invalid_feedback(action.error)
            self._respond(traj, ToolCallRecord(len(traj.turns) - 1, "", None, feedback, True), [])
            return None
        traj.invalid_streak = 0
        record_call = ToolCallRecord(len(traj.turns) - 1, action.name, action.arguments, "", False)
        limit = self.cfg.max_calls_per_tool.get(action.name)
        if limit is not None and traj.calls_of(action.name) >= limit:
            record_call.result, record_call.is_error = f"Error: {action.name} may be called at most {limit} times; answer with what you have", True
            traj.tool_calls.append(record_call)
            self._respond(traj, record_call, [], call_id)
            return None
        return traj, ToolCall(action.name, action.arguments, ToolContext(list(traj.images))), record_call

    def _out_of_budget(self, traj: Trajectory) -> bool:
        if len(traj.turns) >= self.cfg.max_turns:
            traj.stop_reason = "max_turns"
        elif self._budget(traj) <= 0:
            traj.stop_reason = "max_tokens"
        return traj.done

    def _run_tools(self, pending: list[tuple[Trajectory, ToolCall, ToolCallRecord]]) -> None:
        if not pending:
            return
        t0 = time.perf_counter()
        results = self.toolbox.call_batch([call for _, call, _ in pending])
        self.timings.tools_s += time.perf_counter() - t0
        for (traj, _, record), result in zip(pending, results):
            result = self._limit_images(traj, result)
            record.result, record.is_error, record.box = result.text, result.is_error, result.box
            record.new_images = list(range(len(traj.images), len(traj.images) + len(result.images)))
            traj.tool_calls.append(record)
            self._respond(traj, record, result.images, f"call_{record.turn}")

    def _limit_images(self, traj: Trajectory, result: ToolResult) -> ToolResult:
        if len(traj.images) + len(result.images) <= self.cfg.max_images:
            return result
        return ToolResult.error(f"the conversation already has {len(traj.images)} images (limit {self.cfg.max_images}); "
                                "work with the images you have")

    def _respond(self, traj: Trajectory, record: ToolCallRecord, images: list, call_id: str | None = None) -> None:
        """Append the observation (a tool result or an error) and enforce the context limit."""
        fields = {"tool_call_id": call_id, "name": record.name} if call_id else {}
        text = record.result
        if self.builder is not None:
            text = self.builder.clip_text(text, self.cfg.max_tool_response_tokens)
        if traj.token_exact:
            self.builder.add_tool_response(traj, text, images, **fields)
            if len(traj.token_ids) >= self.cfg.max_total_tokens:
                traj.truncate(self.cfg.max_total_tokens, self.builder.vision_start_id)
        else:
            add_tool_message(traj, text, images, **fields)
        self.on_event(traj, "tool", record)
