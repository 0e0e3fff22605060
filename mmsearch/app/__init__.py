"""`mmsearch app`: a Gradio page to ask the agent about an image and to browse run trajectories.

- `policies`: each policy (model dir or OpenAI-compatible URL) loaded once; per-question limits.
- `ask`: upload checks, the KB's scenes as examples, a streamed run as a renderable record.
- `browse`: eval and RL run dirs opened, filtered and rendered.
- `ui`: `build_app(...) -> gr.Blocks` and `serve(app, host, port)`.

Every trajectory is drawn by `mmsearch.eval.render.render_trajectory`, as in report.html.
`build_app` and `serve` are imported on first use, so the pure modules load without Gradio.
"""

from __future__ import annotations

__all__ = ["build_app", "serve"]


def __getattr__(name: str):
    if name in __all__:
        from mmsearch.app import ui

        return getattr(ui, name)
    raise AttributeError(f"module 'mmsearch.app' has no attribute {name!r}")
