"""mmsearch: the agent and training core (protocol, trajectories, engines, rewards, SFT, RL, eval, CLI)."""

__version__ = "0.1.0"
