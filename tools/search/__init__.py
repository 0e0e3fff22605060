"""Search backends: in-process over an index dir, remote through the tool server, and a disk cache."""

from tools.search.types import Hit, SearchBackend, TextMode

__all__ = ["Hit", "SearchBackend", "TextMode"]
