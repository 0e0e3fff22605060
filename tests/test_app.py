"""`mmsearch app` without a browser: the Ask and Browse views' work as plain functions.

A scripted chat-level policy (crop, then answer) with the real crop tool runs the Ask path end to
end: the record grown from streamed events equals the run's own, and the JSON download is the
trajectory in the message schema. Bad uploads, bad policies and an endpoint that is down come back
as messages, and the same app serves the next question. Browse opens hand-written eval and RL run
dirs and filters them. Nothing here builds a world or an index, so the module runs in seconds.
"""

from __future__ import annotations

import copy
import json
import re
import socket
from pathlib import Path

import pytest
from PIL import Image

from mmsearch.agent.api import Agent
from mmsearch.agent.config import AgentConfig
from mmsearch.agent.loop import AgentLoop
from mmsearch.app import ask as asking
from mmsearch.app import browse
from mmsearch.app.policies import Policies, UserError, check_policy, pretrained_factory
from mmsearch.engines.openai_chat import OpenAIChatEngine
from mmsearch.engines.scripted import ScriptedEngine, replay
from mmsearch.protocols.qwen_tools import format_tool_call, format_turn
from tools.config import ToolsConfig
from tools.registry import build_toolbox

QUESTION = "Which nation's flag is top-left?"
BBOX = [8, 8, 40, 32]
CROP = format_turn("Look closer.", format_tool_call("crop", {"image": 0, "bbox": BBOX}))
ANSWER = format_turn("It is Ibrovova's flag.", "<answer>Ibrovova</answer>")


def scripted_agent(turns=(CROP, ANSWER), tools=("crop",)) -> Agent:
    """A chat-level scripted policy over the real crop tool (no index, no model)."""
    toolbox = build_toolbox(ToolsConfig(enabled=list(tools)), None)
    return Agent(AgentLoop(ScriptedEngine(None, replay({"ask": list(turns)})), toolbox, None, AgentConfig()))


@pytest.fixture
def scene(tmp_path: Path) -> Path:
    path = tmp_path / "scene.png"
    image = Image.new("RGB", (96, 64), (30, 90, 160))
    image.paste((230, 40, 40), (10, 10, 40, 30))
    image.save(path)
    return path


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- Ask -----------------------------------------------------------------------------------------------------


def test_a_run_streams_turn_by_turn_and_downloads_its_record(scene, tmp_path):
    policies = Policies(lambda name: scripted_agent())
    views = list(asking.run_ask(policies, str(scene), QUESTION, "scripted", 4, 0.0, ["crop"], downloads=tmp_path / "dl"))
    assert [v.kind for v in views] == ["working"] * (len(views) - 1) + ["done"]
    assert views[0].status.startswith("Loading the policy scripted")
    # the crop shows (as image 1, its box drawn on image 0) before the run is over
    crop_view = next(v for v in views if v.kind == "working" and 'alt="image 1"' in v.html)
    assert 'class="mms-boxed" data-source="0"' in crop_view.html and "mms-final" not in crop_view.html
    done = views[-1]
    assert "Ibrovova" in done.status and "mms-final" in done.html and done.download
    saved = json.loads(Path(done.download).read_text(encoding="utf-8"))
    expected = scripted_agent().ask(scene, QUESTION).to_record()
    assert saved == json.loads(json.dumps(expected))
    roles = [m["role"] for m in saved["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]
    assert saved["messages"][1]["content"] == [{"type": "image", "image": 0}, {"type": "text", "text": QUESTION}]
    assert saved["messages"][2]["tool_calls"][0]["function"]["name"] == "crop"
    tool = saved["messages"][3]
    assert tool["tool_call_id"] == "call_0" and tool["name"] == "crop"
    assert {"type": "image", "image": 1} in tool["content"]
    assert saved["final_answer"] == "Ibrovova" and saved["stop_reason"] == "answered"
    # the policy is loaded once: the next question reuses it
    again = list(asking.run_ask(policies, str(scene), QUESTION, "scripted", 4, 0.0, ["crop"], downloads=tmp_path))
    assert not again[0].status.startswith("Loading") and again[-1].kind == "done"


def test_the_streamed_record_equals_the_runs_own(scene):
    """The record built from events (what the page draws mid-run) is the trajectory's, system prompt aside."""
    snapshots = [copy.deepcopy(s.record) for s in asking.stream_run(scripted_agent(), Image.open(scene), QUESTION)]
    final, before_done = snapshots[-1], snapshots[-2]
    assert before_done["messages"] == final["messages"][1:]
    assert [(c["name"], c["arguments"], c["new_images"], c["is_error"]) for c in before_done["tool_calls"]] == \
        [(c["name"], c["arguments"], c["new_images"], c["is_error"]) for c in final["tool_calls"]]
    assert [t["action"] for t in before_done["turns"]] == [t["action"] for t in final["turns"]]


def test_invalid_actions_and_limits_show_in_the_stream(scene, tmp_path):
    policies = Policies(lambda name: scripted_agent(turns=("no tags at all", CROP, CROP, ANSWER)))
    views = list(asking.run_ask(policies, str(scene), QUESTION, "p", 3, 0.7, ["crop"], downloads=tmp_path))
    done = views[-1]
    assert done.kind == "done" and "max_turns" in done.status  # the page's turn limit, not the config's 6
    assert "invalid action" in done.html and "crop result" in done.html
    record = json.loads(Path(done.download).read_text())
    assert [t["action"] for t in record["turns"]] == ["invalid", "tool_call", "tool_call"]  # the third call never ran
    assert len(record["tool_calls"]) == 1
    # a tool the policy was opened without
    views = list(asking.run_ask(policies, str(scene), QUESTION, "p", 2, 0.0, ["crop", "text_search"], downloads=tmp_path))
    assert views[-1].kind == "error" and "opened without text_search" in views[-1].status
    # no tools: the system prompt lists none, and a crop is an unknown tool
    views = list(asking.run_ask(Policies(lambda name: scripted_agent()), str(scene), QUESTION, "p", 3, 0.0, [],
                                downloads=tmp_path))
    assert views[-1].kind == "done" and "unknown tool" in views[-1].html


@pytest.mark.parametrize("make, expected", [
    (lambda d: None, "Upload an image or pick one of the examples first."),
    (lambda d: d / "gone.png", "is gone from the server"),
    (lambda d: (d / "x.png").write_bytes(b"not an image") and d / "x.png", "Cannot read the image x.png: it is not an image"),
    (lambda d: _truncated_png(d / "cut.png"), "Cannot read the image cut.png"),
    (lambda d: _image(d / "wide.png", (5000, 8)), "is 5000×8 pixels; the limit is 4096 pixels a side"),
])
def test_bad_uploads_are_refused_with_a_message(tmp_path, make, expected):
    with pytest.raises(UserError) as err:
        asking.check_image(make(tmp_path))
    assert expected in str(err.value)
    assert str(tmp_path) not in str(err.value)  # the server's upload path is not shown


def test_the_byte_limit_and_a_good_image(tmp_path):
    path = _image(tmp_path / "ok.png", (64, 48), mode="RGBA")
    with pytest.raises(UserError, match=r"the limit is 0 MB"):
        asking.check_image(path, max_bytes=10)
    image = asking.check_image(path)
    assert image.mode == "RGB" and image.size == (64, 48)
    with pytest.raises(UserError, match="Type a question"):
        asking.check_question("  ")


def _image(path: Path, size, mode="RGB") -> Path:
    Image.new(mode, size, (10, 20, 30, 255)[: len(mode)]).save(path)
    return path


def _truncated_png(path: Path) -> Path:
    full = path.with_suffix(".full.png")
    Image.effect_noise((256, 256), 60).convert("RGB").save(full)
    path.write_bytes(full.read_bytes()[:1500])  # a valid header, then the data stops
    return path


def test_errors_on_the_page_never_stop_the_app(scene, tmp_path):
    good = scripted_agent()
    port = _closed_port()

    def load(name: str) -> Agent:
        if name == "down":  # an OpenAI-compatible endpoint nobody listens on
            engine = OpenAIChatEngine(api_base=f"http://127.0.0.1:{port}/v1", model="m", max_retries=0, timeout_s=5)
            return Agent(AgentLoop(engine, build_toolbox(ToolsConfig(enabled=["crop"]), None), None, AgentConfig()))
        if name == "broken":
            raise RuntimeError("weights are missing\nTraceback (most recent call last): ...")
        return good

    policies = Policies(load)
    run = lambda policy, image=str(scene): list(asking.run_ask(
        policies, image, QUESTION, policy, 3, 0.0, ["crop"], downloads=tmp_path))
    down = run("down")[-1]
    assert down.kind == "error" and down.download is None
    assert down.status.startswith(f"The run failed: POST http://127.0.0.1:{port}/v1/chat/completions failed")
    broken = run("broken")[-1]
    assert broken.kind == "error" and broken.status == "Could not load the policy broken: weights are missing"
    assert "broken" not in policies.loaded()  # not kept: a fix on disk is picked up by the next ask
    assert run("")[-1].status.startswith("Choose a policy")
    assert run("good", image=None)[-1].status.startswith("Upload an image")
    assert run("good")[-1].kind == "done"  # and the app goes on serving


def test_an_endpoint_that_is_down_names_the_endpoint(scene, tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/v1"

    def load(name: str) -> Agent:
        engine = OpenAIChatEngine(api_base=name, model="m", max_retries=0, timeout_s=5)
        return Agent(AgentLoop(engine, build_toolbox(ToolsConfig(enabled=["crop"]), None), None, AgentConfig()))

    [*_, last] = asking.run_ask(Policies(load), str(scene), QUESTION, url, 3, 0.0, ["crop"], downloads=tmp_path)
    assert last.kind == "error" and last.status.startswith(f"The policy endpoint {url} failed: ")
    assert "Traceback" not in last.status


def test_a_dir_that_is_not_a_policy(tmp_path):
    with pytest.raises(UserError, match="No such model dir"):
        check_policy(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="is not a policy: it has no config.json"):
        check_policy(str(tmp_path))
    assert check_policy(" http://127.0.0.1:1/v1 ") == "http://127.0.0.1:1/v1"
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "config.json").write_text("{}")
    policies = Policies(pretrained_factory(None))
    for name, text in ((str(tmp_path), "is not a policy"), (str(fake), f"Could not load the policy {fake}: ")):
        with pytest.raises(UserError, match=re.escape(text)):
            policies.get(name)
    assert policies.loaded() == []


def test_examples_come_from_the_kb_the_index_was_built_on(tmp_path):
    from tools.index.manifest import Manifest

    kb, index = tmp_path / "kb", tmp_path / "index"
    (kb / "scenes").mkdir(parents=True)
    (index / "bm25").mkdir(parents=True)
    Manifest("bm25", "bm25s", "1", 0, "", "fingerprint", str(kb), 0).save(index / "bm25")
    for i in range(3):
        _image(kb / "scenes" / f"scene_{i}.png", (32, 24))
    (kb / "entities.jsonl").write_text("".join(json.dumps(e) + "\n" for e in [
        {"id": "n0", "kind": "nation"}, {"id": "p0", "kind": "person"}, {"id": "r0", "kind": "river"}]))
    scenes = [{"id": "s0", "path": "scenes/scene_0.png", "objects": [{"entity_id": "p0", "position": "right"},
                                                                       {"entity_id": "n0", "position": "top-left"}]},
              {"id": "s1", "path": "scenes/scene_1.png", "objects": [{"entity_id": "r0", "position": "bottom"}]},
              {"id": "s2", "path": "scenes/scene_2.png", "objects": []}]
    (kb / "scenes.jsonl").write_text("".join(json.dumps(s) + "\n" for s in scenes))
    assert asking.kb_of_index(index) == kb
    assert asking.scene_examples(kb) == [
        [str(kb / "scenes/scene_0.png"), "What is the capital of the nation whose flag is at the top left?"],
        [str(kb / "scenes/scene_1.png"), "What is shown at the bottom of the image?"],
        [str(kb / "scenes/scene_2.png"), "What does this image show?"]]
    assert len(asking.scene_examples(kb, limit=2)) == 2
    (kb / "scenes.jsonl").unlink()  # a KB without the index of its scenes: the files, with a plain question
    assert [q for _, q in asking.scene_examples(kb)] == ["What does this image show?"] * 3
    assert asking.scene_examples(None) == [] and asking.kb_of_index(tmp_path / "nothing") is None


# -- Browse --------------------------------------------------------------------------------------------------


def _record(i: int, *, right: bool | None, tools=(), hops=1, kind="nation", stop="answered", answer="Ibrovova"):
    rewards = {} if right is None else {"exact_match": float(right), "substring": float(right)}
    calls = [{"turn": t, "name": name, "arguments": {"query": "q"} if name != "crop" else {"image": 0, "bbox": BBOX},
              "result": "[1] Ibrovova\nA nation.", "is_error": False, "new_images": []} for t, name in enumerate(tools)]
    messages = [{"role": "system", "content": "tools"},
                {"role": "user", "content": [{"type": "image", "image": 0}, {"type": "text", "text": f"question {i}"}]}]
    for call in calls:
        messages += [{"role": "assistant", "content": format_turn("t", format_tool_call(call["name"], call["arguments"]))},
                     {"role": "tool", "tool_call_id": f"call_{call['turn']}", "name": call["name"],
                      "content": [{"type": "text", "text": call["result"]}]}]
    messages.append({"role": "assistant", "content": format_turn("t", f"<answer>{answer}</answer>")})
    return {"example_id": f"ex{i}", "sample": 0, "messages": messages, "final_answer": answer, "stop_reason": stop,
            "rewards": rewards, "turns": [{"action": "tool_call"}] * len(calls) + [{"action": "answer"}],
            "tool_calls": calls, "answers": ["Ibrovova", "Commonwealth of Ibrovova"], "kind": kind, "hops": hops}


@pytest.fixture
def eval_run(tmp_path: Path) -> Path:
    run = tmp_path / "eval"
    (run / "images").mkdir(parents=True)
    _image(run / "images" / "ex0-0.jpg", (40, 30))
    records = [_record(0, right=True, tools=("image_search", "text_search")),
               _record(1, right=False, tools=("crop",), hops=2, kind="city", answer="Reisos"),
               _record(2, right=True, hops=0, kind="count"),
               _record(3, right=False, stop="max_turns", tools=("text_search",), hops=2, kind="city", answer="x")]
    records[0]["image_files"] = ["images/ex0-0.jpg"]
    records[1]["image_files"] = ["../../outside.jpg"]  # a path that leaves the run dir is not followed
    (run / "trajectories.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + "{not json\n")
    (run / "summary.json").write_text(json.dumps({"overall": {"accuracy_metric": "substring"}}))
    return run


def test_browse_filters_an_eval_run(eval_run):
    run = browse.open_run(str(eval_run))
    assert run.kind == "eval" and run.metric == "substring" and len(run.records) == 4
    assert "1 unreadable lines skipped" in run.describe()
    f = browse.facets(run)
    assert f["hops"] == ["all", "0", "1", "2"] and f["kind"] == ["all", "city", "count", "nation"]
    assert f["tool"] == ["all", "no tool", "crop", "image_search", "text_search"]
    assert f["stop"] == ["all", "answered", "max_turns"] and "step" not in f
    assert browse.filter_records(run) == [0, 1, 2, 3]
    assert browse.filter_records(run, correct="correct") == [0, 2]
    assert browse.filter_records(run, correct="wrong", hops="2") == [1, 3]
    assert browse.filter_records(run, tool="text_search") == [0, 3]
    assert browse.filter_records(run, tool="no tool") == [2]
    assert browse.filter_records(run, kind="city", stop="max_turns") == [3]
    assert browse.filter_records(run, correct="unscored") == []
    assert browse.filter_records(run, correct="correct", kind="city") == []
    shown = browse.filter_records(run, correct="wrong")
    line = browse.position_line(run, shown, 1)
    assert line.startswith("2 of 2 matching (4 in the run) · #3 ex3/0")
    assert "policy: x · gold: Ibrovova | Commonwealth of Ibrovova · wrong" in line
    assert browse.position_line(run, [], 0) == "No trajectory matches these filters (4 in the run)."
    html = browse.render_record(run, 0)
    assert "gold: Ibrovova | Commonwealth of Ibrovova" in html and 'alt="image 0"' in html and "correct" in html
    assert "image 0: not saved" in browse.render_record(run, 1)  # the outside path was not opened


def test_browse_an_rl_runs_sampled_trajectories_with_gold_from_its_dataset(tmp_path):
    from datasets import Dataset, DatasetDict

    data = tmp_path / "dataset"
    rows = {"id": ["ex0", "ex1"], "question": ["q0", "q1"], "answers": [["Ibrovova"], ["Reisos"]],
            "kind": ["nation", "city"], "hops": [1, 2]}
    DatasetDict({"train": Dataset.from_dict(rows)}).save_to_disk(str(data))
    run = tmp_path / "rl"
    (run / "trajectories").mkdir(parents=True)
    (run / "rl_config.yaml").write_text(f"data: {data}\nsteps: 2\n")
    for step, ids in ((1, (0, 1)), (2, (1,)), (10, (0,))):
        records = []
        for i in ids:
            record = _record(i, right=i == 0, tools=("image_search",) if i else ())
            for key in ("answers", "kind", "hops"):
                del record[key]  # RL logs carry none of these
            records.append({"step": step, **record})
        (run / "trajectories" / f"step-{step:06d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    opened = browse.open_run(run)
    assert opened.kind == "rl" and [r["step"] for r in opened.records] == [1, 1, 2, 10]  # steps in number order
    assert f"gold answers from {data}" in opened.describe()
    assert [r["answers"] for r in opened.records] == [["Ibrovova"], ["Reisos"], ["Reisos"], ["Ibrovova"]]
    assert browse.facets(opened)["step"] == ["all", "1", "2", "10"]
    assert browse.filter_records(opened, step="1", hops="2") == [1]
    assert browse.filter_records(opened, tool="image_search", correct="wrong") == [1, 2]
    html = browse.render_record(opened, 1)
    assert "image 0: not saved" in html and "gold: Reisos" in html
    assert browse.open_run(run / "trajectories").kind == "rl"  # the folder itself opens too
    assert browse.find_runs(tmp_path) == [str(run)]
    (run / "rl_config.yaml").unlink()
    assert "gold answers unknown (no rl_config.yaml)" in browse.open_run(run).describe()


@pytest.mark.parametrize("path, expected", [("", "Type the path of a run dir"), ("missing", "No such dir"),
                                            (".", "holds no trajectories")])
def test_browse_errors(tmp_path, path, expected):
    with pytest.raises(UserError, match=expected):
        browse.open_run(str(tmp_path / path) if path else "")


def test_the_cli_refuses_a_bad_policy_before_serving(tmp_path, capsys):
    from mmsearch.cli.main import main

    assert main(["app", "--index", str(tmp_path)]) == 2
    assert "needs a policy" in capsys.readouterr().err
    assert main(["app", "--model", str(tmp_path / "nope"), "--index", str(tmp_path)]) == 2
    assert "No such model dir" in capsys.readouterr().err
