"""mmsearch: the agent and training core (protocol, trajectories, engines, rewards, SFT, RL, eval, CLI).

`mmsearch.Agent` is the entry point for scripts (see `mmsearch.agent.api`). It is imported on
first use, so `import mmsearch` (and the CLI's `--help`) stays free of torch and transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = ["Agent", "AgentEvent", "AgentResult", "__version__"]
_LAZY = {"Agent", "AgentEvent", "AgentResult"}  # from mmsearch.agent.api, on first use

if TYPE_CHECKING:
    from mmsearch.agent.api import Agent, AgentEvent, AgentResult


def __getattr__(name: str):
    if name in _LAZY:
        from mmsearch.agent import api

        return getattr(api, name)
    raise AttributeError(f"module 'mmsearch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
