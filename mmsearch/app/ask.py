"""The Ask view's work, without the UI: check an upload, pick example scenes, stream a run into a renderable record.

`StreamedRecord` turns `Agent.stream` events into the record `render_trajectory` draws (the same
shape as `Trajectory.to_record()`, grown turn by turn); at the end it becomes the run's own record,
which is also what the JSON download holds (`write_record`). Everything here is plain Python:
the page (`mmsearch.app.ui`) only shows what these functions return.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from mmsearch.agent.api import AgentEvent, load_image
from mmsearch.app.policies import Policies, UserError, summary
from mmsearch.eval.render import render_trajectory

log = logging.getLogger(__name__)

MAX_IMAGE_SIDE = 4096  # pixels: larger uploads are refused (the policy would see them resized anyway)
MAX_IMAGE_BYTES = 20 * 2**20
_NUMBERS = itertools.count(1)  # download file names: two runs in one second never collide


def check_image(path: str | Path | None, max_side: int = MAX_IMAGE_SIDE, max_bytes: int = MAX_IMAGE_BYTES) -> Image.Image:
    """The uploaded image as RGB; UserError when there is none, it is too large, or it cannot be read."""
    if path is None or str(path) == "":
        raise UserError("Upload an image or pick one of the examples first.")
    path = Path(path)
    name = path.name
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise UserError(f"The image {name} is gone from the server ({exc.strerror}); upload it again.") from exc
    if size > max_bytes:
        raise UserError(f"The image {name} is {size / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.0f} MB.")
    try:
        with Image.open(path) as img:  # reads the header only: a huge image is refused before it is decoded
            width, height = img.size
    except Image.DecompressionBombError as exc:
        raise UserError(f"The image {name} is too large to open ({exc}).") from exc
    except (OSError, SyntaxError) as exc:
        raise UserError(f"Cannot read the image {name}: it is not an image file, or it is damaged.") from exc
    if max(width, height) > max_side:
        raise UserError(f"The image {name} is {width}×{height} pixels; the limit is {max_side} pixels a side. "
                        "Scale it down and upload it again.")
    try:
        return load_image(path, what="the image")
    except ValueError as exc:  # a valid header over truncated or damaged data
        raise UserError(f"Cannot read the image {name}: {_strip_path(str(exc), path)}") from exc


def _strip_path(text: str, path: Path) -> str:
    """An error text without the server-side upload path (the user knows the file by its name)."""
    return text.replace(str(path), path.name)


def check_question(question: str | None) -> str:
    question = (question or "").strip()
    if not question:
        raise UserError("Type a question about the image.")
    return question


# -- example scenes ------------------------------------------------------------------------------------------

# kind -> a question about the pictured entity at {pos} (what the world's scenes show; see DESIGN.md's KB dir)
_SCENE_QUESTIONS = {
    "nation": "What is the capital of the nation whose flag is at the {pos}?",
    "city": "In which nation is the city whose seal is at the {pos}?",
    "organisation": "Who founded the organisation whose emblem is at the {pos}?",
    "artwork": "Who painted the painting at the {pos}?",
    "person": "Where was the person whose portrait is at the {pos} born?",
}


def kb_of_index(index: str | Path | None) -> Path | None:
    """The KB dir an index dir was built from (its manifests name it), if it still exists."""
    from tools.index.manifest import MANIFEST_FILE, Manifest

    if not index:
        return None
    for manifest in sorted(Path(index).glob(f"*/{MANIFEST_FILE}")):
        try:
            kb = Manifest.load(manifest.parent).kb_dir
        except (OSError, ValueError, TypeError):  # IndexLoadError is a ValueError; TypeError: unknown keys
            continue
        if kb and Path(kb).is_dir():
            return Path(kb)
    return None


def scene_examples(kb: str | Path | None, limit: int = 12) -> list[list[str]]:
    """[[image path, question], ...] for the KB's first `limit` scenes (scenes.jsonl, else scenes/*.png|jpg)."""
    if kb is None:
        return []
    kb = Path(kb)
    kinds = {}
    if (kb / "entities.jsonl").is_file():
        with open(kb / "entities.jsonl", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    entity = json.loads(line)
                    kinds[entity.get("id")] = entity.get("kind")
    examples = []
    if (kb / "scenes.jsonl").is_file():
        with open(kb / "scenes.jsonl", encoding="utf-8") as f:
            for line in f:
                if len(examples) >= limit:
                    break
                if not line.strip():
                    continue
                scene = json.loads(line)
                path = kb / scene["path"]
                if path.is_file():
                    examples.append([str(path), _scene_question(scene.get("objects") or [], kinds)])
    else:
        files = sorted(p for p in (kb / "scenes").glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        examples = [[str(p), "What does this image show?"] for p in files[:limit]]
    return examples


def _scene_question(objects: list[dict], kinds: dict[str, str]) -> str:
    for kind, question in _SCENE_QUESTIONS.items():  # in this order of preference
        for obj in objects:
            if kinds.get(obj.get("entity_id")) == kind and obj.get("position"):
                return question.format(pos=obj["position"].replace("-", " "))
    if objects and objects[0].get("position"):
        return f"What is shown at the {objects[0]['position'].replace('-', ' ')} of the image?"
    return "What does this image show?"


# -- a streamed run ------------------------------------------------------------------------------------------

@dataclass
class StreamedRecord:
    """A run's record as `Agent.stream` events arrive: what `render_trajectory` needs, turn by turn."""

    record: dict = field(default_factory=lambda: {"example_id": "ask", "sample": 0, "messages": [], "turns": [],
                                                  "tool_calls": [], "final_answer": None, "stop_reason": None,
                                                  "rewards": {}})
    images: dict[int, Image.Image] = field(default_factory=dict)
    result: object = None  # the AgentResult once the run is done

    def add(self, event: AgentEvent) -> None:
        r = self.record
        if event.kind == "start":
            self.images.update(zip(event.image_numbers, event.images))
            r["messages"].append({"role": "user", "content": [*({"type": "image", "image": n} for n in event.image_numbers),
                                                              {"type": "text", "text": event.text}]})
        elif event.kind == "turn":
            message = {"role": "assistant", "content": event.text}
            if event.action == "tool_call":
                message["tool_calls"] = [{"id": f"call_{event.turn}", "type": "function", "function": {
                    "name": event.name, "arguments": json.dumps(event.arguments, ensure_ascii=False)}}]
            r["messages"].append(message)
            r["turns"].append({"text": event.text, "action": event.action, "error": event.error})
        elif event.kind == "tool":
            self.images.update(zip(event.image_numbers, event.images))
            fields = {}
            if event.name:  # a tool ran (or was refused); an invalid action's error observation names no call
                fields = {"tool_call_id": f"call_{event.turn}", "name": event.name}
                r["tool_calls"].append({"turn": event.turn, "name": event.name, "arguments": event.arguments,
                                        "result": event.text, "is_error": event.is_error,
                                        "new_images": list(event.image_numbers), "box": event.box})
            r["messages"].append({"role": "tool", **fields, "content": [
                {"type": "text", "text": event.text}, *({"type": "image", "image": n} for n in event.image_numbers)]})
        elif event.kind == "done":
            self.result = event.result
            self.record = event.result.to_record()
            self.images = dict(enumerate(event.result.images))

    @property
    def done(self) -> bool:
        return self.result is not None

    def html(self) -> str:
        return render_trajectory(self.record, self.images)

    def status(self) -> str:
        """One line on where the run is."""
        r = self.record
        if self.done:
            answer = r["final_answer"] if r["final_answer"] is not None else "no answer"
            return (f"Done: {answer} (stopped: {r['stop_reason']}; {len(r['turns'])} turns, "
                    f"{len(r['tool_calls'])} tool calls).")
        last = r["messages"][-1] if r["messages"] else None
        turn = len(r["turns"])
        if last is None or last["role"] == "user" or last["role"] == "tool":
            return f"Turn {turn + 1}: the policy is writing …"
        if last.get("tool_calls"):
            return f"Turn {turn}: running {last['tool_calls'][0]['function']['name']} …"
        return f"Turn {turn}: …"


def stream_run(agent, image: Image.Image, question: str) -> Iterator[StreamedRecord]:
    """The run's record after each event of `agent.stream` (the same object, grown)."""
    state = StreamedRecord()
    for event in agent.stream(image, question):
        state.add(event)
        yield state


def write_record(record: dict, folder: str | Path) -> Path:
    """The trajectory as JSON (`Trajectory.to_record()`: messages in DESIGN.md's schema, turns, tool calls)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = folder / f"trajectory-{stamp}-{os.getpid()}-{next(_NUMBERS)}.json"
    path.write_text(json.dumps(record, ensure_ascii=False, indent=1), encoding="utf-8")
    return path



EMPTY = '<div class="mms-app-empty">The trajectory shows here, turn by turn.</div>'


@dataclass
class AskView:
    """What the Ask view shows at one moment: a status line (working, done or error), the trajectory, the download."""

    kind: str
    status: str
    html: str = EMPTY
    download: str | None = None


def run_ask(policies: Policies, image_path, question, policy_name: str, max_turns: int, temperature: float,
            tools, *, downloads: str | Path, max_side: int = MAX_IMAGE_SIDE,
            max_bytes: int = MAX_IMAGE_BYTES) -> Iterator[AskView]:
    """One question, as the page shows it: an AskView after each event, the last one done (with the JSON) or an error.

    Never raises for what a user can cause (bad upload, bad policy) or what a policy or backend does
    mid-run (an endpoint that is down): those end the run with an error view; the partial trajectory stays.
    """
    shown = EMPTY
    try:
        image = check_image(image_path, max_side, max_bytes)
        question = check_question(question)
        name = (policy_name or "").strip()
        if name and name not in policies.loaded():
            yield AskView("working", f"Loading the policy {name} (once; later questions reuse it) …", shown)
        policy = policies.get(name)
        agent = policy.agent_for(max_turns, temperature, list(tools or []))
        state = None
        for state in stream_run(agent, image, question):
            shown = state.html()
            if not state.done:
                yield AskView("working", state.status(), shown)
        if state is None or not state.done:
            raise RuntimeError("the run ended without a result")
        yield AskView("done", state.status(), shown, str(write_record(state.record, downloads)))
    except UserError as exc:
        yield AskView("error", str(exc), shown)
    except Exception as exc:  # a policy, endpoint or backend failing mid-run: say so, keep serving
        log.warning("ask failed", exc_info=True)
        where = f"The policy endpoint {policy_name} failed" if "://" in str(policy_name) else "The run failed"
        yield AskView("error", f"{where}: {summary(exc)}", shown)
