"""The page: a Gradio Blocks app with two tabs, Ask and Browse, over `mmsearch.app.ask` and `mmsearch.app.browse`.

`build_app` takes the policies (a `Policies` cache, or a function that loads an `Agent` from a
policy name: tests pass a scripted one) and returns the Blocks; `serve` launches it with the
trajectory CSS, on loopback unless told otherwise. Every handler catches what a user can cause
(`UserError`) and what a policy or backend can throw mid-run, and shows it as a message on the
page: the app never shows a traceback and keeps serving. Gradio's analytics are off, and the page
loads nothing from outside the server (fonts are Gradio's bundled ones; images are data: URIs).
"""

from __future__ import annotations

import os

# no telemetry or version check from any Blocks Gradio builds itself (ours pass analytics_enabled=False)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import logging
import tempfile
from collections.abc import Sequence
from html import escape
from pathlib import Path

import gradio as gr

from mmsearch.app import ask as asking
from mmsearch.app import browse
from mmsearch.app.policies import AgentFactory, Policies, UserError, summary
from mmsearch.eval.render import CSS

log = logging.getLogger(__name__)

TOOLS = ("text_search", "image_search", "crop")
APP_CSS = CSS + """
.mms-app-msg{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;padding:8px 12px;border-radius:6px;
  border:1px solid #c9d1e0;background:#f3f6fd;color:#1d2330}
.mms-app-msg.mms-app-error{border-color:#d64545;background:#fdf3f3;color:#8a1f1f}
.mms-app-msg.mms-app-done{border-color:#2e9b57;background:#eff9f2}
.mms-app-empty{color:#7a8294;font:14px system-ui,sans-serif;padding:24px 4px}
"""


def message(text: str, kind: str = "info") -> str:
    """A one-line message for the page: info, working, done or error."""
    return f'<div class="mms-app-msg mms-app-{kind}" role="{"alert" if kind == "error" else "status"}">{escape(text)}</div>'


def _upload_path(payload) -> str | None:
    """The uploaded image's server-side path, from the raw payload the Ask events take (`preprocess=False`).

    gr.Image's own preprocess opens the file with PIL before the handler runs, and a file PIL cannot
    read would end the event with Gradio's bare "Error"; unopened, it gets `check_image`'s message.
    (Gradio still checks that the path is one of its uploads or cached examples before the handler runs.)
    """
    return payload.get("path") if isinstance(payload, dict) else payload


def build_app(policies: Policies | AgentFactory, *, default_policy: str = "", policy_choices: Sequence[str] = (),
              examples: Sequence[Sequence[str]] = (), runs: Sequence[str] = (), default_run: str = "",
              max_turns: int = 6, temperature: float = 0.0, tools: Sequence[str] = TOOLS,
              max_image_side: int = asking.MAX_IMAGE_SIDE, max_image_bytes: int = asking.MAX_IMAGE_BYTES,
              downloads: str | Path | None = None, title: str = "mmsearch") -> gr.Blocks:
    """The app. `policies`: loaded once per name; `examples`: [image path, question] rows (KB scenes);
    `runs`: run dirs offered in Browse; the limits are the controls' starting values."""
    if not isinstance(policies, Policies):
        policies = Policies(policies)
    downloads = Path(downloads) if downloads else Path(tempfile.mkdtemp(prefix="mmsearch-app-"))
    choices = list(dict.fromkeys([c for c in (default_policy, *policy_choices) if c]))

    def on_ask(image, question, policy_name, turns, temp, enabled):
        for view in asking.run_ask(policies, _upload_path(image), question, policy_name, turns, temp, enabled,
                                   downloads=downloads, max_side=max_image_side, max_bytes=max_image_bytes):
            yield message(view.status, view.kind), view.html, gr.File(value=view.download, visible=bool(view.download))

    def show(run, shown, k):
        if run is None:
            return message("Open a run dir first.", "error"), ""
        if not shown:
            return message(browse.position_line(run, shown, 0)), ""
        k = max(0, min(k, len(shown) - 1))
        try:
            html = browse.render_record(run, shown[k])
        except Exception as exc:  # one bad record must not take the view down
            log.warning("cannot render record %s", shown[k], exc_info=True)
            return message(f"Cannot show trajectory #{shown[k]}: {summary(exc)}", "error"), ""
        return message(browse.position_line(run, shown, k)), html

    filter_names = ("correct", "hops", "kind", "tool", "stop", "step")

    def on_open(path):
        try:
            run = browse.open_run(path)
        except UserError as exc:
            return (None, [], 0, message(str(exc), "error"), "", *[gr.skip()] * len(filter_names))
        options = browse.facets(run)
        updates = [gr.Dropdown(choices=options.get(name, [browse.ALL]), value=browse.ALL,
                               visible=name in options) for name in filter_names]
        status, html = show(run, list(range(len(run.records))), 0)
        status = message(run.describe()) + status
        return (run, list(range(len(run.records))), 0, status, html, *updates)

    def on_filter(run, *values):
        if run is None:
            return [], 0, message("Open a run dir first.", "error"), ""
        shown = browse.filter_records(run, **dict(zip(filter_names, values)))
        return (shown, 0, *show(run, shown, 0))

    def on_step(run, shown, k, delta):
        k = max(0, min(k + delta, len(shown) - 1)) if shown else 0
        return (k, *show(run, shown, k))

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"## {escape(title)}: a multimodal search agent\nAsk a question about an image and watch the "
                    "policy search, crop and answer; or browse the trajectories of an eval or RL run.")
        with gr.Tabs():
            with gr.Tab("Ask", id="ask", elem_id="tab-ask"):
                with gr.Row():
                    with gr.Column(scale=2, min_width=320):
                        image = gr.Image(type="filepath", label="Image", sources=["upload"], height=300,
                                         elem_id="ask-image")
                        question = gr.Textbox(label="Question", lines=2, elem_id="ask-question",
                                              placeholder="What is the capital of the nation whose flag is at the top left?")
                        policy = gr.Dropdown(choices=choices, value=default_policy or None, allow_custom_value=True,
                                             label="Policy: a model dir, or an OpenAI-compatible endpoint URL",
                                             elem_id="ask-policy")
                        with gr.Row():
                            turns = gr.Slider(1, 12, value=max_turns, step=1, label="Max turns", elem_id="ask-turns")
                            temp = gr.Slider(0.0, 1.5, value=temperature, step=0.05, label="Temperature (0: greedy)",
                                             elem_id="ask-temperature")
                        enabled = gr.CheckboxGroup(list(TOOLS), value=[t for t in TOOLS if t in tools], label="Tools",
                                                   elem_id="ask-tools")
                        ask_button = gr.Button("Ask", variant="primary", elem_id="ask-button")
                        if examples:
                            gr.Examples([list(e) for e in examples], inputs=[image, question], label="Scenes from the KB",
                                        examples_per_page=8, elem_id="ask-examples")
                    with gr.Column(scale=3, min_width=420):
                        status = gr.HTML(message("Upload an image (or pick a scene), type a question, press Ask."),
                                         elem_id="ask-status")
                        trajectory = gr.HTML(asking.EMPTY, elem_id="ask-trajectory")
                        download = gr.File(label="Trajectory as JSON (DESIGN.md's message schema)", interactive=False,
                                           visible=False, elem_id="ask-download")
                # one run at a time (runs share each policy's engine and its cache); raw inputs (see _upload_path)
                for trigger in (ask_button.click, question.submit):
                    trigger(on_ask, [image, question, policy, turns, temp, enabled], [status, trajectory, download],
                            preprocess=False, concurrency_limit=1, concurrency_id="policy", api_visibility="private")

            with gr.Tab("Browse", id="browse", elem_id="tab-browse"):
                run_state, shown_state, k_state = gr.State(None), gr.State([]), gr.State(0)
                with gr.Row():
                    path = gr.Dropdown(choices=list(runs), value=default_run or None, allow_custom_value=True,
                                       label="Run dir: an eval run (trajectories.jsonl) or an RL run (trajectories/)",
                                       elem_id="browse-path", scale=5)
                    open_button = gr.Button("Open", elem_id="browse-open", scale=1)
                with gr.Row():
                    filters = [
                        gr.Dropdown([browse.ALL, "correct", "wrong", "unscored"], value=browse.ALL, label="Answer",
                                    elem_id="browse-correct"),
                        gr.Dropdown([browse.ALL], value=browse.ALL, label="Hops", elem_id="browse-hops"),
                        gr.Dropdown([browse.ALL], value=browse.ALL, label="Kind", elem_id="browse-kind"),
                        gr.Dropdown([browse.ALL], value=browse.ALL, label="Tool used", elem_id="browse-tool"),
                        gr.Dropdown([browse.ALL], value=browse.ALL, label="Stop reason", elem_id="browse-stop"),
                        gr.Dropdown([browse.ALL], value=browse.ALL, label="RL step", elem_id="browse-step", visible=False),
                    ]
                with gr.Row():
                    prev_button = gr.Button("◀ Previous", elem_id="browse-prev", size="sm")
                    next_button = gr.Button("Next ▶", elem_id="browse-next", size="sm")
                browse_status = gr.HTML(message("Open a run dir to page through its trajectories."),
                                        elem_id="browse-status")
                browse_view = gr.HTML("", elem_id="browse-trajectory")
                open_button.click(on_open, path, [run_state, shown_state, k_state, browse_status, browse_view, *filters],
                                  api_visibility="private")
                gr.on([f.input for f in filters], on_filter, [run_state, *filters],
                      [shown_state, k_state, browse_status, browse_view], api_visibility="private")
                prev_button.click(lambda r, s, k: on_step(r, s, k, -1), [run_state, shown_state, k_state],
                                  [k_state, browse_status, browse_view], api_visibility="private")
                next_button.click(lambda r, s, k: on_step(r, s, k, 1), [run_state, shown_state, k_state],
                                  [k_state, browse_status, browse_view], api_visibility="private")
    return app


def serve(app: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, *, allowed_paths: Sequence[str] = (),
          block: bool = True, quiet: bool = False, max_file_size: int = asking.MAX_IMAGE_BYTES):
    """Launch `app` (with the trajectory CSS) on host:port; `block=False` returns at once (tests). Returns its URL."""
    app.queue(default_concurrency_limit=4)
    app.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block, quiet=quiet,
               show_error=False, css=APP_CSS, allowed_paths=list(allowed_paths), max_file_size=max_file_size,
               ssr_mode=False, enable_monitoring=False, mcp_server=False, pwa=False, inbrowser=False,
               footer_links=["settings"])
    return app.local_url
