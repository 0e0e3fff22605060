"""Trajectories as HTML: one trajectory record -> a fragment; an eval run dir -> one self-contained page.

`render_trajectory` is the piece every view shares (`report.html`, an app's Ask and Browse views):
the question and its image, then per assistant turn its thinking, the action (tool call with its
arguments, or the answer) and what came back (passages with their titles, image-search hits, every
crop shown both as the new image and as a box drawn on the image it was cut from), then the final
answer beside the gold answers and whether it was right. Images go in as `data:` URIs and styling
is by class (`CSS`), so a fragment needs no server and no files. Every piece of text is escaped:
the policy writes whatever it likes, `<script>` included.

`render_run` turns a dir written by `mmsearch eval` (trajectories.jsonl with `image_files`,
summary.json) into the page `report.html` holds: the summary tables (the same cells as report.md)
and every trajectory, folded under a one-line summary. Images are downscaled and JPEG-compressed
for the page (a 354-question run is a few MB); the files under images/ keep full resolution.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import re
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path

from PIL import Image, ImageDraw

from mmsearch.protocols import DEFAULT, get_protocol

MAX_SIDE = 320  # longest side of an image on the page, in CSS pixels
JPEG_QUALITY = 60
PNG_PREMIUM = 1.3  # PNG (exact pixels) is kept unless JPEG is more than this many times smaller
BOX_COLOR = (255, 0, 170)  # magenta: rare in the world's scenes, flags and seals

ImageRef = Image.Image | str | Path | None  # a PIL image, a file, or None (not saved)

CSS = """
.mms-traj{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2330;max-width:1100px}
.mms-traj .mms-head{color:#5b6475;font-size:12px;margin:0 0 6px}
.mms-traj .mms-block{border-left:3px solid #c9d1e0;padding:4px 10px;margin:8px 0}
.mms-traj .mms-question{border-color:#3d6fd8;background:#f3f6fd}
.mms-traj .mms-label{font-size:11px;font-weight:600;text-transform:uppercase;letter-spacing:.04em;color:#5b6475}
.mms-traj .mms-think{color:#4a5163;font-style:italic;white-space:pre-wrap;margin:2px 0}
.mms-traj .mms-call code,.mms-traj .mms-args{font:12.5px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.mms-traj .mms-call code{font-weight:600;color:#7a3db8}
.mms-traj .mms-args{white-space:pre-wrap;word-break:break-word}
.mms-traj .mms-result{border-color:#9aa6bd;background:#fafbfc}
.mms-traj .mms-error,.mms-traj .mms-invalid{border-color:#d64545;background:#fdf3f3}
.mms-traj .mms-pre{white-space:pre-wrap;word-break:break-word;margin:2px 0;font-size:13px}
.mms-traj ol.mms-hits{margin:2px 0;padding-left:22px}
.mms-traj ol.mms-hits li{margin:3px 0}
.mms-traj .mms-hit-title{font-weight:600}
.mms-traj .mms-hit-text{color:#3b4252;white-space:pre-wrap}
.mms-traj .mms-hit img{float:left;max-height:56px;margin:2px 8px 2px 0;border:1px solid #d5dae3}
.mms-traj .mms-hit::after{content:"";display:block;clear:both}
.mms-traj .mms-figs{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start;margin:6px 0}
.mms-traj figure{margin:0}
.mms-traj figure img{display:block;max-width:320px;max-height:320px;min-height:48px;border:1px solid #d5dae3;
  image-rendering:auto;background:#fff}
.mms-traj figcaption{font-size:11.5px;color:#5b6475;margin-top:2px;max-width:320px}
.mms-traj .mms-missing{display:inline-block;padding:6px 8px;border:1px dashed #b4bccb;color:#7a8294;font-size:12px}
.mms-traj .mms-final{border-color:#6b7385;background:#f5f6f8}
.mms-traj .mms-final.mms-right{border-color:#2e9b57;background:#eff9f2}
.mms-traj .mms-final.mms-wrong{border-color:#d64545;background:#fdf3f3}
.mms-traj .mms-answer{font-size:15px;font-weight:600}
.mms-traj .mms-badge{display:inline-block;padding:0 7px;border-radius:9px;font-size:12px;font-weight:600;color:#fff;
  background:#6b7385;margin-left:6px;vertical-align:1px}
.mms-badge.mms-right{background:#2e9b57}.mms-badge.mms-wrong{background:#d64545}
.mms-traj .mms-gold{color:#3b4252;margin-top:2px}
.mms-traj .mms-scores{color:#5b6475;font-size:12px}
"""

PAGE_CSS = """
body{margin:24px auto;max-width:1140px;padding:0 16px;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
  color:#1d2330;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:22px 0 8px}
.mms-sub{color:#5b6475;margin:0 0 12px}
table.mms-table{border-collapse:collapse;margin:4px 0 10px;font-size:13px}
table.mms-table th,table.mms-table td{border:1px solid #dde2ea;padding:3px 9px;text-align:right}
table.mms-table th{background:#f3f5f8;font-weight:600}
table.mms-table td:first-child,table.mms-table th:first-child{text-align:left}
details.mms-item{border:1px solid #dde2ea;border-radius:6px;margin:6px 0;padding:0 10px}
details.mms-item[open]{padding-bottom:8px}
details.mms-item>summary{cursor:pointer;padding:6px 0;list-style-position:outside}
details.mms-item>summary .mms-id{font:12px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;color:#5b6475}
details.mms-item>summary .mms-q{margin:0 6px}
details.mms-item>summary .mms-a{color:#5b6475}
pre.mms-system{white-space:pre-wrap;font-size:12px;background:#f5f6f8;padding:8px;border-radius:4px}
"""


# -- crop boxes ---------------------------------------------------------------------------------------------

def draw_box(image: Image.Image, box: Sequence[float]) -> Image.Image:
    """A copy of `image` with `box` ([x1, y1, x2, y2], right/bottom exclusive, in its pixels) outlined inside."""
    out = image.convert("RGB")
    width = max(2, round(max(out.size) / 120))
    x1, y1, x2, y2 = box
    ImageDraw.Draw(out).rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=BOX_COLOR, width=width)
    return out


# -- images -------------------------------------------------------------------------------------------------

def _shrunk(image: Image.Image, max_side: int) -> Image.Image:
    if max(image.size) <= max_side:
        return image.copy()
    out = image.copy()
    out.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return out


def data_uri(image: Image.Image, max_side: int = MAX_SIDE, quality: int = JPEG_QUALITY, sharp: bool = False) -> str:
    """`image` downscaled to `max_side` as a data: URI: PNG unless JPEG is much smaller (`sharp`: no chroma subsampling)."""
    image = _shrunk(image, max_side)
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    png = io.BytesIO()
    image.save(png, "PNG")
    jpeg = io.BytesIO()
    if image.mode != "RGBA":  # flags and seals compress well as PNG; scenes and photos as JPEG
        image.save(jpeg, "JPEG", quality=quality, optimize=True, subsampling=0 if sharp else 2)
    kind, data = ("jpeg", jpeg) if 0 < jpeg.tell() * PNG_PREMIUM < png.tell() else ("png", png)
    return f"data:image/{kind};base64," + base64.b64encode(data.getvalue()).decode("ascii")


@functools.lru_cache(maxsize=32)  # the samples of one question share its image file, and come in a row
def _file_uri(path: str, mtime: float, max_side: int, quality: int) -> str:
    with Image.open(path) as img:
        img.load()
        return data_uri(img, max_side, quality)


class _Images:
    """Image number -> PIL image / data URI, over a list or a {number: image} map of images or files."""

    def __init__(self, images: Sequence[ImageRef] | Mapping[int, ImageRef] | None, max_side: int, quality: int):
        self.images, self.max_side, self.quality = images if images is not None else [], max_side, quality

    def ref(self, n) -> ImageRef:
        if not isinstance(n, int) or n < 0:
            return None
        if isinstance(self.images, Mapping):
            return self.images.get(n, self.images.get(str(n)))
        return self.images[n] if n < len(self.images) else None

    def open(self, n) -> Image.Image | None:
        ref = self.ref(n)
        if ref is None or isinstance(ref, Image.Image):
            return ref
        try:
            with Image.open(ref) as img:
                img.load()
                return img
        except OSError:
            return None

    def uri(self, n) -> str | None:
        ref = self.ref(n)
        if ref is None:
            return None
        if isinstance(ref, Image.Image):
            return data_uri(ref, self.max_side, self.quality)
        try:
            path = Path(ref)
            return _file_uri(str(path), path.stat().st_mtime, self.max_side, self.quality)
        except OSError:
            return None


def _figure(uri: str | None, caption: str, attrs: str = "") -> str:
    if uri is None:
        return f'<figure><span class="mms-missing">{escape(caption)}: not saved</span></figure>'
    return (f'<figure><img src="{uri}" alt="{escape(caption)}"{attrs}>'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def _image_figure(images: _Images, n: int, caption: str | None = None) -> str:
    return _figure(images.uri(n), caption or f"image {n}")


def _boxed_figure(images: _Images, source: int, box: Sequence[float], crop_number: int) -> str:
    caption = f"image {source}, where image {crop_number} was cut (box {list(box)} in its pixels)"
    image = images.open(source)
    if image is None:
        return _figure(None, caption)
    shown = _shrunk(image, images.max_side)
    drawn = draw_box(shown, [v * shown.width / image.width for v in box])
    attrs = (f' class="mms-boxed" data-source="{source}" data-box="{escape(",".join(str(v) for v in box))}"'
             f' data-size="{image.width},{image.height}"')
    return _figure(data_uri(drawn, images.max_side, images.quality, sharp=True), caption, attrs)


# -- one trajectory -----------------------------------------------------------------------------------------

_HIT = re.compile(r"\[(\d+)\] ([^\n]*?)(?: \[image (\d+)\])?(?:\n(.*))?", re.DOTALL)


def _parts(content) -> tuple[str, list[int]]:
    """A message's text and its image numbers (content is a string or a list of text/image parts)."""
    if isinstance(content, str):
        return content, []
    text = "".join(p.get("text", "") for p in content if p.get("type") == "text")
    return text, [p["image"] for p in content if p.get("type") == "image"]


def _hits(text: str, images: _Images) -> tuple[str, set[int]] | None:
    """Search results ("[1] title [image n]\\nsnippet" blocks) as a list; None when the text is not that."""
    blocks = [b for b in text.split("\n\n") if b.strip()]
    matches = [_HIT.fullmatch(b.strip("\n")) for b in blocks]
    if not blocks or not all(matches):
        return None
    items, shown = [], set()
    for m in matches:
        thumb = ""
        if m.group(3) is not None:
            n = int(m.group(3))
            uri = images.uri(n)
            if uri is not None:
                thumb = f'<img src="{uri}" alt="image {n}" title="image {n}">'
                shown.add(n)
        snippet = f'<div class="mms-hit-text">{escape(m.group(4))}</div>' if m.group(4) else ""
        image_tag = f" <span class=\"mms-label\">[image {m.group(3)}]</span>" if m.group(3) else ""
        items.append(f'<li class="mms-hit" value="{int(m.group(1))}">{thumb}'
                     f'<span class="mms-hit-title">{escape(m.group(2))}</span>{image_tag}{snippet}</li>')
    return '<ol class="mms-hits">' + "".join(items) + "</ol>", shown


def _result(message: dict, call: dict | None, images: _Images) -> str:
    text, numbers = _parts(message.get("content", ""))
    name = message.get("name") or (call or {}).get("name") or ""
    is_error = bool(call.get("is_error")) if call else text.startswith("Error")
    label = f"{name} result" if name else "observation"
    body = None
    shown: set[int] = set()
    if not is_error and name in ("text_search", "image_search"):
        parsed = _hits(text, images)
        if parsed is not None:
            body, shown = parsed
    if body is None:
        body = f'<div class="mms-pre">{escape(text)}</div>'
    figures = [_image_figure(images, n) for n in numbers if n not in shown]
    box = call.get("box") if call else None
    if box is not None and numbers and isinstance(call.get("arguments"), dict):
        figures.append(_boxed_figure(images, call["arguments"].get("image"), box, numbers[0]))
    figs = f'<div class="mms-figs">{"".join(figures)}</div>' if figures else ""
    cls = "mms-error" if is_error else "mms-result"
    return f'<div class="mms-block {cls}"><div class="mms-label">{escape(label)}</div>{body}{figs}</div>'


def _turn(k: int, message: dict, turn: dict | None, protocol: str = DEFAULT) -> str:
    text = message.get("content") if isinstance(message.get("content"), str) else _parts(message.get("content"))[0]
    action = get_protocol(protocol).parse(text)
    kind = (turn or {}).get("action") or action.kind
    head = f"turn {k + 1}"
    if turn and turn.get("finish_reason") == "length":
        head += " · cut at the token limit"
    think = f'<div class="mms-think">{escape(action.thinking)}</div>' if action.thinking else ""
    if kind == "tool_call" and action.kind == "tool_call":
        args = json.dumps(action.arguments, ensure_ascii=False)
        body = f'<div class="mms-call"><code>{escape(action.name)}</code> <span class="mms-args">{escape(args)}</span></div>'
        cls = ""
    elif kind == "answer" and action.kind == "answer":
        body = f'<div class="mms-call">answer: <span class="mms-answer">{escape(action.answer)}</span></div>'
        cls = ""
    else:
        error = (turn or {}).get("error") or action.error
        body = (f'<div class="mms-call">invalid action: {escape(error)}</div>'
                f'<div class="mms-pre mms-args">{escape(text)}</div>')
        cls = " mms-invalid"
    return (f'<div class="mms-block mms-turn{cls}"><div class="mms-label">{escape(head)}</div>{think}{body}</div>')


def correctness(record: dict, metric: str | None = None) -> bool | None:
    """Whether the final answer counts as right, by `metric` (default: the summary's accuracy rule); None if unscored."""
    rewards = record.get("rewards") or {}
    if metric is None:
        metric = "substring" if "substring" in rewards else "exact_match"
    value = rewards.get(metric, rewards.get("exact_match"))
    return None if value is None else float(value) >= 0.5


def _final(record: dict, answers: Sequence[str] | None, metric: str | None) -> str:
    answer = record.get("final_answer")
    right = correctness(record, metric)
    if answer is None and record.get("stop_reason") is None and right is None:
        return ""  # still running (a streamed trajectory)
    cls = "" if right is None else (" mms-right" if right else " mms-wrong")
    badge = "" if right is None else ('<span class="mms-badge mms-right">correct</span>' if right
                                      else '<span class="mms-badge mms-wrong">wrong</span>')
    shown = escape(answer) if answer is not None else "<em>no answer</em>"
    gold = ""
    if answers:
        gold = '<div class="mms-gold">gold: ' + " | ".join(escape(str(a)) for a in answers) + "</div>"
    rewards = record.get("rewards") or {}
    scores = [f"{k} {float(rewards[k]):.2f}" for k in ("exact_match", "f1", "substring", "correct", "reward")
              if k in rewards]
    scores_html = f'<div class="mms-scores">{escape(" · ".join(scores))}</div>' if scores else ""
    return (f'<div class="mms-block mms-final{cls}"><div class="mms-label">final answer</div>'
            f'<span class="mms-answer">{shown}</span>{badge}{gold}{scores_html}</div>')


def render_trajectory(record: dict, images: Sequence[ImageRef] | Mapping[int, ImageRef] | None = None, *,
                      answers: Sequence[str] | None = None, metric: str | None = None,
                      show_system: bool = False, max_side: int = MAX_SIDE, quality: int = JPEG_QUALITY) -> str:
    """One trajectory as an HTML fragment (`<article class="mms-traj">`, styled by `CSS`).

    record: `Trajectory.to_record()` (or a line of an eval run's trajectories.jsonl); a running
      trajectory renders what it has so far.
    images: image number -> PIL image or file (a list, or a {number: image} map); missing ones show
      as "not saved".
    answers: the gold answers (default: the record's `answers`); `metric`: the reward that decides
      correct/wrong (default: substring when scored, else exact_match, as the eval summary).
    """
    imgs = _Images(images, max_side, quality)
    answers = record.get("answers") if answers is None else answers
    calls = {c.get("turn"): c for c in record.get("tool_calls", [])}
    turns = record.get("turns", [])
    parts = [f'<div class="mms-head">{escape(_head(record))}</div>']
    k = -1
    for message in record.get("messages", []):
        role = message.get("role")
        if role == "system":
            if show_system:
                parts.append(f'<details class="mms-block"><summary class="mms-label">system prompt</summary>'
                             f'<div class="mms-pre">{escape(_parts(message["content"])[0])}</div></details>')
        elif role == "user":
            text, numbers = _parts(message.get("content", ""))
            figs = "".join(_image_figure(imgs, n) for n in numbers)
            figs = f'<div class="mms-figs">{figs}</div>' if figs else ""
            parts.append(f'<div class="mms-block mms-question"><div class="mms-label">question</div>'
                         f'<div class="mms-pre mms-answer">{escape(text)}</div>{figs}</div>')
        elif role == "assistant":
            k += 1
            parts.append(_turn(k, message, turns[k] if k < len(turns) else None, record.get("protocol", DEFAULT)))
        elif role == "tool":
            call_id = message.get("tool_call_id") or ""
            call = calls.get(int(call_id[5:])) if re.fullmatch(r"call_\d+", call_id) else None
            parts.append(_result(message, call, imgs))
    parts.append(_final(record, answers, metric))
    return '<article class="mms-traj">' + "".join(parts) + "</article>"


def _head(record: dict) -> str:
    bits = [f"{record.get('example_id', '')} · sample {record.get('sample', 0)}"]
    if record.get("stop_reason"):
        bits.append(f"stopped: {record['stop_reason']}")
    bits.append(f"{len(record.get('turns', []))} turns, {len(record.get('tool_calls', []))} tool calls")
    if record.get("n_generated"):
        bits.append(f"{record['n_generated']} generated / {record.get('n_tokens', 0)} tokens")
    for key in ("kind", "hops"):
        if record.get(key) not in (None, "", -1):
            bits.append(f"{key} {record[key]}")
    return " · ".join(bits)


# -- an eval run --------------------------------------------------------------------------------------------

def _html_table(title: str, header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    heading = f"<h2>{escape(title)}</h2>" if title else ""
    return f'{heading}<table class="mms-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def run_images(run: Path, files) -> list[Path | None] | dict[int, Path | None]:
    """A record's `image_files` resolved under the run dir; paths that leave it are ignored."""
    root = run.resolve()

    def inside(rel) -> Path | None:
        if not isinstance(rel, str):
            return None
        path = (run / rel).resolve()
        return path if path.is_relative_to(root) else None

    if isinstance(files, Mapping):
        return {int(k): inside(v) for k, v in files.items()}
    return [inside(f) for f in files or []]


def _question(record: dict) -> str:
    for message in record.get("messages", []):
        if message.get("role") == "user":
            return _parts(message.get("content", ""))[0]
    return ""


def _config_line(run: Path) -> str:
    path = run / "eval_config.yaml"
    if not path.is_file():
        return ""
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return ""
    engine = cfg.get("engine") or {}
    bits = [f"model {engine.get('model')}" if engine.get("model") else "",
            f"data {cfg.get('data')} ({cfg.get('split')})" if cfg.get("data") else "",
            f"{cfg.get('n_samples')} samples per question" if (cfg.get("n_samples") or 1) > 1 else ""]
    return " · ".join(b for b in bits if b)


def render_run(run_dir: str | Path, max_side: int = MAX_SIDE, quality: int = JPEG_QUALITY) -> str:
    """The whole report.html page for an eval run dir (trajectories.jsonl, summary.json, images/)."""
    from mmsearch.eval.report import tables

    run = Path(run_dir)
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    with open(run / "trajectories.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    metric = summary.get("overall", {}).get("accuracy_metric")
    config = _config_line(run)
    sub = " · ".join(b for b in (escape(run.resolve().name), escape(config)) if b)
    parts = ["<h1>Evaluation report</h1>", f'<p class="mms-sub">{sub}</p>']
    parts += [_html_table(title, header, rows) for title, header, rows in tables(summary)]
    systems = {_system(r) for r in records} - {""}
    if len(systems) == 1:
        parts.append('<h2>System prompt</h2><details><summary>the prompt every trajectory starts with</summary>'
                     f'<pre class="mms-system">{escape(systems.pop())}</pre></details>')
    n_right = sum(1 for r in records if correctness(r, metric))
    parts.append(f"<h2>Trajectories</h2><p class=\"mms-sub\">{len(records)} trajectories, {n_right} correct "
                 f"({escape(metric or 'exact_match')}); click one to open it.</p>")
    for i, record in enumerate(records):
        right = correctness(record, metric)
        mark = "" if right is None else ('<span class="mms-badge mms-right">✓</span>' if right
                                         else '<span class="mms-badge mms-wrong">✗</span>')
        answer = record.get("final_answer")
        gold = record.get("answers") or []
        summary_line = (f'{mark}<span class="mms-q">{escape(_question(record))}</span>'
                        f'<span class="mms-a">→ {escape(answer) if answer is not None else "no answer"}'
                        f'{" (gold: " + escape(str(gold[0])) + ")" if gold else ""}</span> '
                        f'<span class="mms-id">#{i} {escape(str(record.get("example_id")))}/{record.get("sample", 0)}'
                        f' · {len(record.get("tool_calls", []))} calls</span>')
        fragment = render_trajectory(record, run_images(run, record.get("image_files")), metric=metric,
                                     show_system=len(systems) > 1, max_side=max_side, quality=quality)
        parts.append(f'<details class="mms-item" id="t{i}"><summary>{summary_line}</summary>{fragment}</details>')
    title = f"mmsearch eval · {run.resolve().name}"
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{PAGE_CSS}{CSS}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def _system(record: dict) -> str:
    for message in record.get("messages", []):
        if message.get("role") == "system":
            return _parts(message.get("content", ""))[0]
    return ""


def write_html_report(run_dir: str | Path, **kwargs) -> Path:
    """Render `run_dir` into `run_dir/report.html`; return its path."""
    path = Path(run_dir) / "report.html"
    path.write_text(render_run(run_dir, **kwargs), encoding="utf-8")
    return path
