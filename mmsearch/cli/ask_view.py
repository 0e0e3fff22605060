"""How `mmsearch ask` shows a run as it happens (`Agent.stream` events): each turn, each tool result, saved crops."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mmsearch.agent.api import AgentEvent, AgentResult

RULE = "─" * 72


class AskPrinter:
    def __init__(self, out: Path, as_json: bool = False):
        self.out, self.as_json = out, as_json
        self.saved: dict[int, str] = {}  # image number -> file

    def _print(self, text: str = "") -> None:
        if not self.as_json:  # --json keeps stdout for the one JSON document
            print(text, flush=True)

    def start(self, question: str, image_path: str | None) -> None:
        self._print(f"{RULE}\nquestion: {question}" + (f"\n[image 0] {image_path}" if image_path else ""))

    def show(self, event: AgentEvent) -> None:
        """Print one event of `Agent.stream` (the start event is `start`'s, which knows the image's file)."""
        if event.kind == "turn":
            self._turn(event)
        elif event.kind == "tool":
            self._tool(event)
        elif event.kind == "done":
            self.finish(event.result)

    def _turn(self, event: AgentEvent) -> None:
        self._print(RULE)
        if event.thinking:
            self._print(f"think: {event.thinking}")
        if event.action == "tool_call":
            self._print(f"call:  {event.name}({json.dumps(event.arguments, ensure_ascii=False)})")
        elif event.action == "answer":
            self._print(f"answer: {event.answer}")
        else:
            self._print(f"invalid action ({event.error})\n  wrote: {event.text[:200]!r}")

    def _tool(self, event: AgentEvent) -> None:
        text = event.text if len(event.text) < 1500 else event.text[:1500] + " …"
        self._print(f"{event.name or 'observation'} -> " + text.replace("\n", "\n  "))
        for number, image in zip(event.image_numbers, event.images):
            self.out.mkdir(parents=True, exist_ok=True)
            path = self.out / f"image_{number}.png"
            image.save(path)
            self.saved[number] = str(path)
            self._print(f"  [image {number}] saved to {path}")

    def finish(self, result: AgentResult) -> None:
        traj = result.trajectory
        if self.as_json:
            json.dump({**result.to_record(), "image_files": self.saved}, sys.stdout, ensure_ascii=False)
            print()
            return
        self._print(RULE)
        answer = traj.final_answer if traj.final_answer is not None else "(no answer)"
        self._print(f"final answer: {answer}   [{traj.stop_reason}; {len(traj.turns)} turns, "
                    f"{len(traj.tool_calls)} tool calls, {traj.n_generated} generated tokens]")
