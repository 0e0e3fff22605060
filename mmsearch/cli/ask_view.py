"""How `mmsearch ask` shows a trajectory as it happens: each turn, each tool result, saved crops."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mmsearch.protocol import parse_action
from mmsearch.trajectory import ToolCallRecord, Trajectory, TurnRecord

RULE = "─" * 72


class AskPrinter:
    def __init__(self, out: Path, as_json: bool = False):
        self.out, self.as_json = out, as_json
        self.saved: dict[int, str] = {}  # image number -> file

    def _print(self, text: str = "") -> None:
        if not self.as_json:  # --json keeps stdout for the one JSON document
            print(text, flush=True)

    def start(self, question: str, image_path: str) -> None:
        self._print(f"{RULE}\nquestion: {question}\n[image 0] {image_path}")

    def on_event(self, traj: Trajectory, kind: str, payload) -> None:
        if kind == "turn":
            self._turn(payload)
        elif kind == "tool":
            self._tool(traj, payload)

    def _turn(self, turn: TurnRecord) -> None:
        action = parse_action(turn.text)
        self._print(RULE)
        if action.thinking:
            self._print(f"think: {action.thinking}")
        if turn.action == "tool_call":
            self._print(f"call:  {action.name}({json.dumps(action.arguments, ensure_ascii=False)})")
        elif turn.action == "answer":
            self._print(f"answer: {action.answer}")
        else:
            self._print(f"invalid action ({turn.error})\n  wrote: {turn.text[:200]!r}")

    def _tool(self, traj: Trajectory, record: ToolCallRecord) -> None:
        text = record.result if len(record.result) < 1500 else record.result[:1500] + " …"
        self._print(f"{record.name or 'observation'} -> " + text.replace("\n", "\n  "))
        for number in record.new_images:
            self.out.mkdir(parents=True, exist_ok=True)
            path = self.out / f"image_{number}.png"
            traj.images[number].save(path)
            self.saved[number] = str(path)
            self._print(f"  [image {number}] saved to {path}")

    def finish(self, traj: Trajectory) -> None:
        if self.as_json:
            json.dump({**traj.to_record(), "image_files": self.saved}, sys.stdout, ensure_ascii=False)
            print()
            return
        self._print(RULE)
        answer = traj.final_answer if traj.final_answer is not None else "(no answer)"
        self._print(f"final answer: {answer}   [{traj.stop_reason}; {len(traj.turns)} turns, "
                    f"{len(traj.tool_calls)} tool calls, {traj.n_generated} generated tokens]")
