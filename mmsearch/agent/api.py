"""The agent from Python: load a policy and its tools once, then ask questions about images.

    import mmsearch

    agent = mmsearch.Agent.from_pretrained("runs/demo/sft/final", index="runs/demo/index", temperature=0)
    result = agent.ask("scene.png", "Which nation's flag is top-left?")
    print(result.answer, result.stop_reason, len(result.tool_calls))

`ask` returns an `AgentResult` (the answer, how the run stopped, the conversation in DESIGN.md's
message schema, every image it holds, the raw `Trajectory`); `ask_batch` runs several questions
through one batched `AgentLoop.run`; `stream` yields `AgentEvent`s as the loop produces them (what
`mmsearch ask` prints and the app draws). The loop is built once, so the engine, tools and index
are opened once and reused by every call. Calls are serialized: one loop runs one batch at a time.
"""

from __future__ import annotations

import copy
import io
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from PIL import Image

from mmsearch.agent.config import AgentConfig, SamplingConfig
from mmsearch.agent.loop import AgentLoop, EventHook
from mmsearch.agent.setup import RolloutConfig, build_loop, is_url
from mmsearch.example import Example
from mmsearch.protocols import get_protocol
from mmsearch.trajectory import ToolCallRecord, Trajectory, TurnRecord

ImageInput = str | Path | bytes | bytearray | Image.Image

_LIMITS = {f.name for f in fields(AgentConfig)} - {"sampling"}
_SAMPLING = {f.name for f in fields(SamplingConfig)}


def load_image(image: ImageInput, what: str = "image") -> Image.Image:
    """An RGB copy of `image` (a file path, encoded bytes or a PIL image); ValueError if it cannot be read."""
    if isinstance(image, Image.Image):
        source, name = image, what
    elif isinstance(image, (bytes, bytearray)):
        source, name = io.BytesIO(bytes(image)), f"{what} ({len(image)} bytes)"
    elif isinstance(image, (str, Path)):
        source, name = image, f"{what} {image}"
    else:
        raise TypeError(f"{what} must be a file path, bytes or a PIL image, not {type(image).__name__}")
    try:
        if isinstance(source, Image.Image):
            return source.convert("RGB")  # a copy: the caller's image is never changed
        with Image.open(source) as img:
            return img.convert("RGB")
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        # OSError covers a missing file, an unknown format and truncated data; PIL raises SyntaxError
        # for some malformed headers.
        raise ValueError(f"cannot read {name}: {exc}") from exc


def _question_images(image: ImageInput | None, what: str = "image") -> list[Image.Image]:
    return [] if image is None else [load_image(image, what)]


@dataclass
class AgentResult:
    """What one question came to. `messages` number images; `images[n]` is image n (0: the question's)."""

    answer: str | None  # None when the run stopped without an <answer>
    stop_reason: str  # answered | max_turns | max_tokens | invalid_actions
    messages: list[dict]  # DESIGN.md message schema
    images: list[Image.Image]  # in conversation order: the question's image, then every image a tool returned
    tool_calls: list[ToolCallRecord]
    turns: list[TurnRecord]
    trajectory: Trajectory  # token ids, loss mask, log-probs: everything the loop recorded

    @classmethod
    def from_trajectory(cls, traj: Trajectory) -> AgentResult:
        return cls(traj.final_answer, traj.stop_reason, traj.messages, traj.images, traj.tool_calls, traj.turns, traj)

    def to_record(self) -> dict:
        """The JSON-able trajectory log (images by number), as `mmsearch ask --json` prints it."""
        return self.trajectory.to_record()


@dataclass
class AgentEvent:
    """One step of a streamed run, in the order it happened.

    kind "start": the question, with its image as `images` ([image 0]).
    kind "turn": the policy wrote turn `turn`: its raw `text` and `thinking`; `action` is tool_call
      (`name`, `arguments`), answer (`answer`) or invalid (`error`).
    kind "tool": what came back for turn `turn`: `text` as the policy reads it, `is_error`, and the
      `images` the tool returned, numbered `image_numbers` (`name` is "" for an invalid action's error).
    kind "done": the run ended: `answer`, `stop_reason` and `result`, the AgentResult `ask` returns.
    """

    kind: str
    turn: int = -1  # the assistant turn (0-based) the event belongs to; -1 for start and done
    text: str = ""
    thinking: str = ""
    action: str = ""
    name: str = ""
    arguments: Any = None
    answer: str | None = None
    error: str = ""
    is_error: bool = False
    images: list[Image.Image] = field(default_factory=list)
    image_numbers: list[int] = field(default_factory=list)
    box: list[int] | None = None  # a crop's: where it cut, in pixels of the source image
    stop_reason: str | None = None
    result: AgentResult | None = None


def to_event(traj: Trajectory, kind: str, payload: object) -> AgentEvent:
    """The AgentEvent for one call of the loop's on_event hook."""
    if kind == "turn":
        turn: TurnRecord = payload
        parsed = get_protocol(traj.protocol).parse(turn.text)
        event = AgentEvent("turn", turn=len(traj.turns) - 1, text=turn.text, thinking=parsed.thinking,
                           action=turn.action, error=turn.error)
        if turn.action == "tool_call":
            event.name, event.arguments = parsed.name, parsed.arguments
        elif turn.action == "answer":
            event.answer = parsed.answer
        return event
    if kind == "tool":
        record: ToolCallRecord = payload
        return AgentEvent("tool", turn=record.turn, text=record.result, name=record.name, arguments=record.arguments,
                          is_error=record.is_error, images=[traj.images[n] for n in record.new_images],
                          image_numbers=list(record.new_images), box=record.box)
    if kind == "done":
        return AgentEvent("done", answer=traj.final_answer, stop_reason=traj.stop_reason,
                          result=AgentResult.from_trajectory(traj))
    raise ValueError(f"unknown agent loop event {kind!r}")


class _Cancelled(Exception):
    """Raised inside the loop's worker thread once the stream's consumer has stopped reading."""


_FINISHED = object()


@dataclass
class _Failed:
    error: BaseException


class Agent:
    """A policy, its tools and the agent loop, built once; `ask`, `ask_batch` and `stream` reuse them.

    `Agent(loop)` wraps a loop you built yourself (`mmsearch.agent.setup.build_loop` with any engine,
    e.g. a scripted one); `Agent.from_pretrained` builds one from a model dir or URL.
    """

    def __init__(self, loop: AgentLoop, config: RolloutConfig | None = None):
        self.loop = loop
        self.config = config  # what the loop was built from (None for a hand-built loop)
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path | None = None,
        *,
        index: str | Path | None = None,
        server: str | list[str] | None = None,
        api_base: str | None = None,
        served_model: str | None = None,
        device: str | None = None,
        tools: Iterable[str] | None = None,
        max_turns: int | None = None,
        temperature: float | None = None,
        max_new_tokens_per_turn: int | None = None,
        config: str | Path | RolloutConfig | None = None,
        **limits: Any,
    ) -> Agent:
        """Load a policy and open its tools.

        model: a policy dir (run locally by `transformers`: the hf engine), or an http(s) URL of an
          OpenAI-compatible endpoint (the openai engine; `served_model` names the model there,
          "default" if unset). `api_base=URL` does the same with `model` as the served name.
          None: the config's engine.
        index: an index dir searched in-process; server: tool-server URL(s) instead (replicas).
        device: "auto", "cpu", "cuda", ... for the policy and the search encoders.
        tools: the tool names to enable (default all three; only "crop" needs no index).
        max_turns, temperature (0: greedy), max_new_tokens_per_turn, and any other `AgentConfig`
          limit (max_images, max_total_tokens, ...) or `SamplingConfig` field (top_p, seed, ...)
          as keyword arguments.
        config: an `EvalConfig`/`RolloutConfig` YAML file or object for everything else (it is
          copied, never changed); arguments given here override it. None: the schema's defaults,
          as `mmsearch ask` without `--config` (sampling at temperature 1.0).
        """
        if config is None:
            cfg = RolloutConfig()
        elif isinstance(config, RolloutConfig):
            cfg = copy.deepcopy(config)
        else:
            from mmsearch.config import load_config
            from mmsearch.eval.run import EvalConfig

            cfg = load_config(EvalConfig, config)  # eval configs work too (data keys unused)

        model = None if model is None else str(model)
        api_base = api_base or (model if model and is_url(model) else None)
        if api_base:
            kept = cfg.engine.model if cfg.engine.kind == "openai" else None  # a config's served name
            served = served_model or (model if model and not is_url(model) else None)
            cfg.engine.kind, cfg.engine.api_base, cfg.engine.model = "openai", api_base, served or kept or "default"
        elif model:
            cfg.engine.model = model
            if cfg.engine.kind == "openai":  # a model dir runs locally
                cfg.engine.kind = "hf"
        if index is not None:
            cfg.index, cfg.server = str(index), []
        if server is not None:
            cfg.server = [server] if isinstance(server, str) else list(server)
        if device is not None:
            cfg.engine.device = device
        if tools is not None:
            cfg.tools.enabled = [tools] if isinstance(tools, str) else list(tools)
        named = {"max_turns": max_turns, "temperature": temperature, "max_new_tokens_per_turn": max_new_tokens_per_turn}
        for key, value in {**{k: v for k, v in named.items() if v is not None}, **limits}.items():
            if key in _LIMITS:
                setattr(cfg.agent, key, value)
            elif key in _SAMPLING:
                setattr(cfg.agent.sampling, key, value)
            else:
                raise TypeError(f"unknown agent setting {key!r}; known: {', '.join(sorted(_LIMITS | _SAMPLING))}")
        return cls(build_loop(cfg), cfg)

    # -- asking ----------------------------------------------------------------------------------

    def ask(self, image: ImageInput | None, question: str) -> AgentResult:
        """Answer one question about `image` (a path, encoded bytes or a PIL image; None: a text-only question,
        what a text-only policy takes)."""
        [result] = self._run([Example("ask", question, _question_images(image), answers=[])])
        return result

    def ask_batch(self, items: Iterable[tuple[ImageInput | None, str]]) -> list[AgentResult]:
        """Answer several (image, question) pairs together, one batched engine call per turn; results in order."""
        examples = [Example(f"ask{i}", question, _question_images(image, f"image of item {i}"), answers=[])
                    for i, (image, question) in enumerate(items)]
        return self._run(examples) if examples else []

    def stream(self, image: ImageInput | None, question: str) -> Iterator[AgentEvent]:
        """Ask, yielding `AgentEvent`s (start, then turn/tool per turn, then done) as they happen.

        The loop runs in a worker thread; its errors are raised here. Stopping early (`break`,
        `close()`) stops the run at its next event and waits for the worker to end (a Ctrl-C does
        not wait; the next call does, as calls are serialized).
        """
        return self._stream(_question_images(image), question)

    def _stream(self, images: list[Image.Image], question: str) -> Iterator[AgentEvent]:
        yield AgentEvent("start", text=question, images=images, image_numbers=list(range(len(images))))
        events: queue.Queue = queue.Queue()
        stop = threading.Event()

        def hook(traj: Trajectory, kind: str, payload: object) -> None:
            if stop.is_set():
                raise _Cancelled
            events.put(to_event(traj, kind, payload))

        def work() -> None:
            try:
                self._run([Example("ask", question, images, answers=[])], hook)
            except _Cancelled:
                pass
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, who raises it
                events.put(_Failed(exc))
                return
            events.put(_FINISHED)

        worker = threading.Thread(target=work, name="mmsearch-agent-stream", daemon=True)
        worker.start()
        interrupted = False
        try:
            while (item := events.get()) is not _FINISHED:
                if isinstance(item, _Failed):
                    raise item.error
                yield item
        except KeyboardInterrupt:
            interrupted = True  # Ctrl-C returns at once; the worker still stops at its next event
            raise
        finally:
            stop.set()
            if not interrupted:
                worker.join()  # the run is over before the next call can start (it holds the lock anyway)

    def _run(self, examples: list[Example], on_event: EventHook | None = None) -> list[AgentResult]:
        with self._lock:  # the loop holds one batch's state (and the engine's cache) at a time
            saved = self.loop.on_event  # a hand-built loop's own hook keeps seeing every event

            def both(traj: Trajectory, kind: str, payload: object) -> None:
                saved(traj, kind, payload)
                if on_event is not None:
                    on_event(traj, kind, payload)

            self.loop.on_event = both
            try:
                trajectories = self.loop.run(examples)
            finally:
                self.loop.on_event = saved
        return [AgentResult.from_trajectory(t) for t in trajectories]
