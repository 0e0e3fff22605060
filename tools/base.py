"""The Tool interface and the Toolbox that calls tools without ever raising into the caller.

A tool declares a name, a description and JSON-schema parameters (what the policy's system prompt
lists), and runs a batch of already-validated calls. The Toolbox validates arguments against the
schema, runs each tool's calls as one batch (so searches from many rollouts share one encoder and
FAISS call), enforces a timeout, and turns every failure into an error result a model can act on.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import jsonschema
from PIL import Image

logger = logging.getLogger(__name__)


@dataclass
class ToolResult:
    """What a tool call returns: text for the model, new images, and whether it is an error."""

    text: str
    images: list[Image.Image] = field(default_factory=list)
    is_error: bool = False
    # crop: where the new image was cut, [x1, y1, x2, y2] in pixels of the source image as stored (for logs
    # and viewers; the model reads `text`)
    box: list[int] | None = None

    @classmethod
    def error(cls, message: str) -> ToolResult:
        return cls(text=f"Error: {message}", is_error=True)


@dataclass
class ToolContext:
    """The conversation's images so far, numbered by position (0 = the question's image)."""

    images: list[Image.Image] = field(default_factory=list)


@dataclass
class ToolCall:
    name: str
    arguments: Any  # parsed JSON; validated by the Toolbox, so it may be anything here
    context: ToolContext = field(default_factory=ToolContext)


class ToolInputError(ValueError):
    """A call's arguments are well-typed but unusable (image number out of range, bad bbox, ...)."""


class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments object

    def check(self, arguments: dict, context: ToolContext) -> None:
        """Raise ToolInputError for arguments the schema cannot rule out. Runs before `run_batch`."""

    def run_batch(self, calls: list[tuple[dict, ToolContext]]) -> list[ToolResult]:
        raise NotImplementedError

    def schema(self) -> dict:
        """The function schema as Qwen/OpenAI function calling lists it."""
        return {"type": "function", "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


def new_image_number(context: ToolContext, offset: int = 0) -> int:
    """The number the conversation will give the `offset`-th image this call returns."""
    return len(context.images) + offset


def image_arg(context: ToolContext, number: int) -> Image.Image:
    """Resolve an image number to the image, with an error message that lists the valid numbers."""
    if not context.images:
        raise ToolInputError("there are no images in this conversation")
    if not 0 <= number < len(context.images):
        raise ToolInputError(
            f"image {number} does not exist; images in this conversation are numbered 0 to {len(context.images) - 1}"
        )
    return context.images[number]


class Toolbox:
    def __init__(self, tools: list[Tool], timeout_s: float = 30.0):
        self.tools = {tool.name: tool for tool in tools}
        self.timeout_s = timeout_s
        self._validators = {
            tool.name: jsonschema.Draft202012Validator(tool.parameters) for tool in tools
        }
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(tools)), thread_name_prefix="tool")

    def schemas(self) -> list[dict]:
        return [tool.schema() for tool in self.tools.values()]

    def call(self, name: str, arguments: Any, context: ToolContext | None = None) -> ToolResult:
        return self.call_batch([ToolCall(name, arguments, context or ToolContext())])[0]

    def call_batch(self, calls: list[ToolCall]) -> list[ToolResult]:
        """Results in the order of `calls`. Never raises: every failure is an error result."""
        results: list[ToolResult | None] = [None] * len(calls)
        valid: dict[str, list[int]] = defaultdict(list)
        for i, call in enumerate(calls):
            problem = self._problem(call)
            if problem:
                results[i] = ToolResult.error(problem)
            else:
                valid[call.name].append(i)
        futures = {
            name: self._pool.submit(self.tools[name].run_batch, [(calls[i].arguments, calls[i].context) for i in idx])
            for name, idx in valid.items()
        }
        for name, future in futures.items():
            for i, result in zip(valid[name], self._collect(name, future, len(valid[name]))):
                results[i] = result
        return results  # type: ignore[return-value]

    def _problem(self, call: ToolCall) -> str | None:
        tool = self.tools.get(call.name)
        if tool is None:
            return f"unknown tool {call.name!r}; available tools: {', '.join(self.tools)}"
        if not isinstance(call.arguments, dict):
            return f"arguments of {call.name} must be a JSON object, got {type(call.arguments).__name__}"
        error = jsonschema.exceptions.best_match(self._validators[call.name].iter_errors(call.arguments))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path)
            return f"invalid arguments for {call.name}: {(where + ': ') if where else ''}{error.message}"
        try:
            tool.check(call.arguments, call.context)
        except ToolInputError as exc:
            return f"{call.name}: {exc}"
        return None

    def _collect(self, name: str, future: concurrent.futures.Future, n: int) -> list[ToolResult]:
        try:
            results = future.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            return [ToolResult.error(f"{name} timed out after {self.timeout_s:g}s; try again or change the request")] * n
        except Exception as exc:  # a failing backend must not crash the rollout (DESIGN invariant 5)
            logger.exception("tool %s failed", name)
            return [ToolResult.error(f"{name} failed: {type(exc).__name__}: {exc}")] * n
        if len(results) != n:
            return [ToolResult.error(f"{name} returned {len(results)} results for {n} calls")] * n
        return results

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
