"""Build the toolbox the policy uses from config and a search backend (in-process or a tool server)."""

from __future__ import annotations

from tools.base import Tool, Toolbox
from tools.config import ToolsConfig
from tools.crop import CropTool
from tools.search.types import SearchBackend
from tools.search_tools import ImageSearchTool, TextSearchTool

TOOL_BUILDERS = {
    "text_search": lambda backend, cfg: TextSearchTool(backend, cfg),
    "image_search": lambda backend, cfg: ImageSearchTool(backend, cfg),
    "crop": lambda backend, cfg: CropTool(cfg.vision),
}


def build_toolbox(cfg: ToolsConfig, backend: SearchBackend | None) -> Toolbox:
    """The enabled tools over `backend` (wrapped in the disk cache when `cfg.cache_dir` is set)."""
    unknown = [name for name in cfg.enabled if name not in TOOL_BUILDERS]
    if unknown:
        raise ValueError(f"unknown tools in config: {unknown}; known: {sorted(TOOL_BUILDERS)}")
    needs_backend = [name for name in cfg.enabled if name != "crop"]
    if needs_backend and backend is None:
        raise ValueError(f"tools {needs_backend} need a search backend (an index dir or a tool server)")
    if backend is not None and cfg.cache_dir:
        from tools.search.cache import CachedSearch

        backend = CachedSearch(backend, cfg.cache_dir)
    tools: list[Tool] = [TOOL_BUILDERS[name](backend, cfg) for name in cfg.enabled]
    return Toolbox(tools, timeout_s=cfg.timeout_s)


def tool_schemas(cfg: ToolsConfig) -> list[dict]:
    """The enabled tools' JSON schemas (what a system prompt lists), without a backend to search."""
    return [TOOL_BUILDERS[name](None, cfg).schema() for name in cfg.enabled]


def open_backend(index: str, servers: list[str], cfg: ToolsConfig, device: str = "auto") -> SearchBackend:
    """Search through the tool-server replicas in `servers`, or in-process over the `index` dir."""
    if servers:
        from tools.server.client import SearchClient

        return SearchClient(servers, timeout_s=cfg.timeout_s)
    from tools.search.local import LocalSearch

    return LocalSearch(index, device=device, default_mode=cfg.text_mode)
