"""The app's policies: each one loaded once (a model dir, or an OpenAI-compatible endpoint), then reused by every ask.

Loading a policy (weights, processor, indexes) takes seconds to minutes, so `Policies` keeps each
loaded `Agent` by the name the user typed. The limits a user picks per question (turns,
temperature, which tools) do not reload anything: `Policy.agent_for` builds a fresh `AgentLoop` on
the same engine, trajectory builder and tool objects. What a user can get wrong (a dir that is not
a policy, an endpoint that is down) comes back as a `UserError` whose text the page shows.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from mmsearch.agent.api import Agent
from mmsearch.agent.loop import AgentLoop
from mmsearch.agent.setup import is_url
from tools.base import Toolbox

log = logging.getLogger(__name__)

AgentFactory = Callable[[str], Agent]  # policy name (a model dir or URL) -> a loaded Agent


class UserError(ValueError):
    """Something the person using the app can fix; its text is what the page shows."""


def summary(exc: BaseException, limit: int = 300) -> str:
    """One readable line for an exception (its first line, cut), never a traceback."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[:limit] + " …"


def check_policy(policy: str) -> str:
    """The policy name, stripped; UserError when it is neither an http(s) URL nor a dir that holds a model."""
    policy = policy.strip()
    if is_url(policy):
        return policy
    path = Path(policy).expanduser()
    if not path.exists():
        raise UserError(f"No such model dir: {policy}. Give a policy dir (a checkpoint's final/) or an http(s) endpoint URL.")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise UserError(f"{policy} is not a policy: it has no config.json. Give a model dir written by "
                        "`mmsearch sft`/`mmsearch rl` (…/final), a Hugging Face model dir, or an endpoint URL.")
    return policy


def pretrained_factory(config) -> AgentFactory:
    """Load a policy name with `Agent.from_pretrained(name, config=config)`: a `RolloutConfig` (or an eval config
    YAML) naming the tools (index dir or tool servers), the device and the rest; each load copies it."""

    def load(policy: str) -> Agent:
        return Agent.from_pretrained(check_policy(policy), config=config)

    return load


class Policy:
    """A loaded Agent and the tool subsets built over its tools (one Toolbox per subset, reused)."""

    def __init__(self, name: str, agent: Agent):
        self.name, self.agent = name, agent
        self._toolboxes: dict[tuple[str, ...], Toolbox] = {}

    @property
    def tools(self) -> list[str]:
        return list(self.agent.loop.toolbox.tools)

    def agent_for(self, max_turns: int, temperature: float, tools: Sequence[str]) -> Agent:
        """An Agent on this policy's engine with these limits and only these tools (the system prompt lists them)."""
        base = self.agent.loop
        missing = [t for t in tools if t not in base.toolbox.tools]
        if missing:
            raise UserError(f"This policy was opened without {', '.join(missing)} (it has: {', '.join(self.tools)}).")
        names = tuple(t for t in base.toolbox.tools if t in tools)
        if names not in self._toolboxes:
            self._toolboxes[names] = Toolbox([base.toolbox.tools[t] for t in names], timeout_s=base.toolbox.timeout_s)
        sampling = dataclasses.replace(base.cfg.sampling, temperature=float(temperature))
        cfg = dataclasses.replace(base.cfg, max_turns=int(max_turns), sampling=sampling)
        return Agent(AgentLoop(base.engine, self._toolboxes[names], base.builder, cfg), self.agent.config)


class Policies:
    """Loaded policies by name; a name that fails to load is not kept (the user may fix it and retry)."""

    def __init__(self, factory: AgentFactory):
        self.factory = factory
        self._loaded: dict[str, Policy] = {}
        self._lock = threading.Lock()  # two first asks of one policy load it once

    def get(self, name: str) -> Policy:
        name = (name or "").strip()
        if not name:
            raise UserError("Choose a policy: a model dir (e.g. runs/demo/sft/final) or an OpenAI-compatible endpoint URL.")
        with self._lock:
            if name not in self._loaded:
                try:
                    agent = self.factory(name)
                except UserError:
                    raise
                except Exception as exc:  # any failure to load is the user's to fix; the log keeps the trace
                    log.warning("could not load policy %s", name, exc_info=True)
                    raise UserError(f"Could not load the policy {name}: {summary(exc)}") from exc
                self._loaded[name] = Policy(name, agent)
            return self._loaded[name]

    def loaded(self) -> list[str]:
        return list(self._loaded)
