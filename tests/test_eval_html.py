"""report.html: a real eval (scripted policy, real tools and index) rendered into one self-contained page.

The scripted policy crops, image-searches (with thumbnails), text-searches and answers; another
trajectory writes `<script>` into its thinking and answer; a third makes an invalid action first.
The page is parsed with the standard library's html.parser and checked for: no external resource,
every trajectory, crops as data: images with their box drawn on the source image where the crop
tool cut it, escaped policy text, and the summary tables' numbers equal to summary.json's.
"""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmsearch.engines.scripted import ScriptedEngine
from mmsearch.eval.render import BOX_COLOR, render_trajectory
from mmsearch.eval.run import EvalConfig, run_eval
from mmsearch.protocols.qwen_tools import format_tool_call, format_turn

GOLD = "Ibrovova"
BBOX = [10, 10, 120, 100]  # in the tiny policy's view of the scene
EVIL = '<script>alert("pwned")</script>'


def _call(name: str, **arguments) -> str:
    return format_turn(f"use {name}", format_tool_call(name, arguments))


SCRIPTS = {
    "ex0": [_call("crop", image=0, bbox=BBOX), _call("image_search", image=1, k=2),
            _call("text_search", query="capital of the nation", k=2), format_turn("found it", f"<answer>{GOLD}</answer>")],
    "ex1": [format_turn(f"<b>bold</b> & {EVIL}", f"<answer>{EVIL}</answer>")],
    "ex2": ["I just answer without tags", format_turn("ok", f"<answer>{GOLD}</answer>")],
}


def _write_turn(traj) -> str:
    turns = SCRIPTS[traj.example_id]
    return turns[min(len(traj.turns), len(turns) - 1)]


class Page(HTMLParser):
    """Every tag with its attributes and the trajectory (`<details id="tN">`) it sits in; text; tables."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict, int | None]] = []
        self.text: list[str] = []
        self.tables: list[list[list[str]]] = []
        self.current: int | None = None
        self.in_hit = False
        self.hit_images = 0
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "details" and (attrs.get("id") or "").startswith("t"):
            self.current = int(attrs["id"][1:])
        self.tags.append((tag, attrs, self.current))
        if tag == "li" and "mms-hit" in (attrs.get("class") or ""):
            self.in_hit = True
        if tag == "img" and self.in_hit:
            self.hit_images += 1
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "li":
            self.in_hit = False
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def imgs(self, **where) -> list[tuple[dict, int | None]]:
        return [(a, t) for tag, a, t in self.tags if tag == "img" and all(a.get(k) == v for k, v in where.items())]


def _decode(uri: str) -> Image.Image:
    assert uri.startswith("data:image/")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")


@pytest.fixture(scope="module")
def run(world_dir: Path, index_dir: Path, policy_dir: Path, hf_engine, tmp_path_factory) -> dict:
    scene_record = json.loads((world_dir / "scenes.jsonl").read_text().splitlines()[0])
    scene = str(world_dir / scene_record["path"])
    tmp = tmp_path_factory.mktemp("eval_html")
    data = tmp / "questions.jsonl"
    rows = [{"id": f"ex{i}", "question": "Which nation's flag is this?", "answers": [GOLD], "image": scene,
             "kind": "nation", "hops": 1, "requires_search": True} for i in range(3)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = EvalConfig(data=str(data), out=str(tmp / "out"), index=str(index_dir), n_samples=2)
    cfg.engine.model, cfg.engine.device = str(policy_dir), "cpu"
    cfg.tools.image_thumbnails = True
    engine = ScriptedEngine(hf_engine.tokenizer, _write_turn)
    summary = run_eval(cfg, engine=engine, progress=False)
    out = Path(cfg.out)
    html = (out / "report.html").read_text(encoding="utf-8")
    page = Page()
    page.feed(html)
    records = [json.loads(line) for line in (out / "trajectories.jsonl").read_text().splitlines()]
    return {"out": out, "html": html, "page": page, "records": records, "summary": summary, "scene": scene,
            "hf_engine": hf_engine}


def test_the_page_is_self_contained(run):
    page: Page = run["page"]
    for tag, attrs, _ in page.tags:
        assert tag not in ("script", "link", "iframe", "object", "embed"), tag
        for key in ("src", "href"):
            if key not in attrs:
                continue
            value = (attrs[key] or "").strip().lower()
            assert not value.startswith(("http:", "https:", "//", "file:")), (tag, key, value)
            if key == "src":
                assert value.startswith("data:image/"), value
    assert "http://" not in run["html"] and "https://" not in run["html"] and "@import" not in run["html"]


def test_every_trajectory_is_on_the_page(run):
    page, records = run["page"], run["records"]
    assert len(records) == 6
    items = [a for tag, a, _ in page.tags if tag == "details" and (a.get("id") or "").startswith("t")]
    articles = [a for tag, a, _ in page.tags if tag == "article" and a.get("class") == "mms-traj"]
    assert len(items) == len(articles) == len(records)
    text = "".join(page.text)
    for r in records:
        assert f"{r['example_id']} · sample {r['sample']}" in text
    # every trajectory shows its question image, and the gold answer in its folded line and by its final answer
    assert {t for a, t in page.imgs(alt="image 0")} == set(range(6))
    assert text.count(f"gold: {GOLD}") == 2 * 6


def test_images_are_saved_and_named_in_the_records(run):
    out, records = run["out"], run["records"]
    by_key = {(r["example_id"], r["sample"]): r for r in records}
    crops = [by_key["ex0", s] for s in (0, 1)]
    assert crops[0]["image_files"][0] == crops[1]["image_files"][0] == "images/ex0-0.jpg"  # samples share it
    assert len(crops[0]["image_files"]) == crops[0]["n_images"] == 4  # question, crop, 2 thumbnails
    assert crops[0]["image_files"][1] != crops[1]["image_files"][1]
    for r in records:
        assert len(r["image_files"]) == r["n_images"]
        assert all((out / f).is_file() for f in r["image_files"])
        assert r["answers"] == [GOLD] and r["kind"] == "nation" and r["hops"] == 1 and r["requires_search"] is True


def test_crop_box_is_where_the_crop_tool_cut(run):
    from mmsearch.agent.setup import vision_from_processor
    from tools.config import VisionResizeConfig
    from tools.imaging import seen_size, seen_to_original_box

    record = next(r for r in run["records"] if r["example_id"] == "ex0")
    [crop_call] = [c for c in record["tool_calls"] if c["name"] == "crop"]
    original = Image.open(run["scene"]).convert("RGB")
    vision = vision_from_processor(run["hf_engine"].processor, VisionResizeConfig())
    expected = seen_to_original_box(tuple(BBOX), original.size, seen_size(*original.size, vision))
    assert crop_call["box"] == list(expected)
    assert crop_call["box"] != BBOX  # the tiny policy sees a resized image: the mapping matters
    saved_crop = np.asarray(Image.open(run["out"] / record["image_files"][1]).convert("RGB"))
    assert np.array_equal(saved_crop, np.asarray(original.crop(expected)))
    assert Image.open(run["out"] / record["image_files"][0]).size == original.size  # boxes are in these pixels


def test_crop_is_an_image_and_its_box_is_drawn_on_the_source(run):
    page, records = run["page"], run["records"]
    i = next(k for k, r in enumerate(records) if r["example_id"] == "ex0")
    box = records[i]["tool_calls"][0]["box"]
    [(crop_img, _)] = [(a, t) for a, t in page.imgs(alt="image 1") if t == i]
    crop_shown = _decode(crop_img["src"])
    assert crop_shown.size == (box[2] - box[0], box[3] - box[1])
    [(boxed, _)] = [(a, t) for tag, a, t in page.tags if tag == "img" and a.get("class") == "mms-boxed" and t == i]
    assert boxed["data-source"] == "0" and boxed["data-box"] == ",".join(map(str, box))
    drawn = np.asarray(_decode(boxed["src"])).astype(int)
    [(question_img, _)] = [(a, t) for a, t in page.imgs(alt="image 0") if t == i]
    plain = np.asarray(_decode(question_img["src"])).astype(int)
    assert drawn.shape == plain.shape
    width, _ = map(int, boxed["data-size"].split(","))
    s = drawn.shape[1] / width
    x1, y1, x2, y2 = (round(v * s) for v in box)
    mx, my = (x1 + x2) // 2, (y1 + y2) // 2
    edges = [(y1 + 1, mx), (y2 - 2, mx), (my, x1 + 1), (my, x2 - 2)]  # (row, col) just inside each side
    for row, col in edges:
        assert np.abs(drawn[row, col] - np.array(BOX_COLOR)).max() < 60, (row, col, drawn[row, col])
        assert np.abs(plain[row, col] - np.array(BOX_COLOR)).max() >= 60
    # only the outline is drawn: the inside of the box and the rest of the image are the source's
    inside = (slice(y1 + 6, y2 - 6), slice(x1 + 6, x2 - 6))
    assert np.abs(drawn[inside] - plain[inside]).mean() < 8
    assert np.abs(drawn[: max(1, y1 - 4)] - plain[: max(1, y1 - 4)]).mean() < 8


def test_search_results_show_titles_and_thumbnails(run):
    page, text = run["page"], "".join(run["page"].text)
    assert page.hit_images >= 2  # image_search hits with thumbnails, per trajectory of ex0
    assert "text_search result" in text and "image_search result" in text
    titles = [a for tag, a, _ in page.tags if tag == "span" and a.get("class") == "mms-hit-title"]
    assert len(titles) >= 4 * 2  # 2 image hits + 2 passages, in each of ex0's two trajectories


def test_policy_text_is_escaped(run):
    page, html = run["page"], run["html"]
    assert not any(tag in ("script", "b") for tag, _, _ in page.tags)
    text = "".join(page.text)
    assert EVIL in text and "<b>bold</b> & " in text  # shown as text ...
    assert "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt;" in html  # ... because it was escaped
    assert "I just answer without tags" in text and "invalid action" in text


def test_summary_tables_equal_summary_json(run):
    page, summary = run["page"], json.loads((run["out"] / "summary.json").read_text())
    assert summary["overall"] == run["summary"]["overall"]
    headline = page.tables[0]
    o = summary["overall"]
    assert headline[1][:5] == [str(o["n_questions"]), str(o["n_trajectories"]), f"{100 * o['em']:.1f}%",
                               f"{100 * o['f1']:.1f}%", f"{100 * o['accuracy']:.1f}%"]
    assert (o["n_questions"], o["n_trajectories"]) == (3, 6) and o["em"] == pytest.approx(4 / 6)
    tools = next(t for t in page.tables if t[0][0] == "tool")
    assert {row[0]: int(row[3]) for row in tools[1:]} == {k: v["calls"] for k, v in summary["tools"].items()}
    stops = next(t for t in page.tables if t[0][0] == "stop reason")
    assert {row[0]: int(row[1]) for row in stops[1:]} == summary["stop_reasons"]


def test_cli_rerenders_a_run_dir(run):
    from mmsearch.cli.main import main

    path = run["out"] / "report.html"
    path.unlink()
    assert main(["eval", "report", str(run["out"])]) == 0
    assert path.read_text(encoding="utf-8") == run["html"]


def test_fragment_from_live_images_draws_the_box_the_crop_tool_reports(run):
    """The Ask view's path: a record and PIL images; the box comes from the crop tool (ToolResult.box)."""
    record = json.loads(json.dumps(next(r for r in run["records"] if r["example_id"] == "ex0")))
    box = record["tool_calls"][0]["box"]
    images = [Image.open(run["out"] / f).convert("RGB") for f in record["image_files"]]
    page = Page()
    page.feed(render_trajectory(record, images))
    [boxed] = [a for tag, a, _ in page.tags if tag == "img" and a.get("class") == "mms-boxed"]
    assert boxed["data-box"] == ",".join(map(str, box))
    page = Page()
    page.feed(render_trajectory(record, {0: images[0]}))  # the crop not at hand: its box still drawn, it "not saved"
    assert [a for tag, a, _ in page.tags if tag == "img" and a.get("class") == "mms-boxed"]
    assert "image 1: not saved" in "".join(page.text)
    del record["tool_calls"][0]["box"]  # a record from before crops reported their box: no box drawn
    page = Page()
    page.feed(render_trajectory(record, images))
    assert not [a for tag, a, _ in page.tags if tag == "img" and a.get("class") == "mms-boxed"]
