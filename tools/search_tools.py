"""`text_search(query, k)` and `image_search(image, k)`: the two search tools over any SearchBackend."""

from __future__ import annotations

from tools.base import Tool, ToolContext, ToolInputError, ToolResult, image_arg, new_image_number
from tools.config import ToolsConfig
from tools.search.types import Hit, SearchBackend

# One passage and what separates it from the next; the result's trailing whitespace is stripped.
PASSAGE_FORMAT = "[{rank}] {title}\n{text}\n\n"


def _snippet(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rsplit(" ", 1)[0] + "…"


def _k_schema(cfg: ToolsConfig) -> dict:
    return {"type": "integer", "minimum": 1, "maximum": cfg.max_k, "description": f"number of results (default {cfg.default_k})"}


def _group_by_k(calls: list[tuple[dict, ToolContext]], default_k: int) -> dict[int, list[int]]:
    """Call indexes grouped by k: one backend call per distinct k (usually just the default)."""
    groups: dict[int, list[int]] = {}
    for i, (args, _) in enumerate(calls):
        groups.setdefault(args.get("k", default_k), []).append(i)
    return groups


class TextSearchTool(Tool):
    name = "text_search"

    def __init__(self, backend: SearchBackend, cfg: ToolsConfig):
        self.backend, self.cfg = backend, cfg
        self.description = "Search a text knowledge base. Returns the top passages (title and text) for the query."
        self.parameters = {
            "type": "object",
            "properties": {"query": {"type": "string", "description": "what to search for"}, "k": _k_schema(cfg)},
            "required": ["query"],
            "additionalProperties": False,
        }

    def check(self, arguments: dict, context: ToolContext) -> None:
        query = arguments["query"]
        if not query.strip():
            raise ToolInputError("query is empty; write what you are looking for")
        if len(query) > self.cfg.max_query_chars:
            raise ToolInputError(f"query is {len(query)} characters; the limit is {self.cfg.max_query_chars}")

    def run_batch(self, calls: list[tuple[dict, ToolContext]]) -> list[ToolResult]:
        by_k = _group_by_k(calls, self.cfg.default_k)
        results: list[ToolResult | None] = [None] * len(calls)
        for k, idx in by_k.items():
            queries = [" ".join(calls[i][0]["query"].split()) for i in idx]
            for i, query, hits in zip(idx, queries, self.backend.text_search(queries, k, self.cfg.text_mode)):
                results[i] = ToolResult(self._format(query, hits))
        return results  # type: ignore[return-value]

    def _format(self, query: str, hits: list[Hit]) -> str:
        if not hits:
            return f"No passages found for {query!r}."
        layout = self.cfg.passage_format or PASSAGE_FORMAT
        return "".join(layout.format(rank=rank, title=hit.title, text=_snippet(hit.text, self.cfg.snippet_chars))
                       for rank, hit in enumerate(hits, 1)).rstrip()


class ImageSearchTool(Tool):
    name = "image_search"

    def __init__(self, backend: SearchBackend, cfg: ToolsConfig):
        self.backend, self.cfg = backend, cfg
        self.description = (
            "Reverse image search: find knowledge-base entries that look like an image. `image` is the "
            "image number (the question's image is 0; crops get new numbers). Returns the top matches' titles and descriptions."
        )
        self.parameters = {
            "type": "object",
            "properties": {
                "image": {"type": "integer", "minimum": 0, "description": "number of the image to search with"},
                "k": _k_schema(cfg),
            },
            "required": ["image"],
            "additionalProperties": False,
        }

    def check(self, arguments: dict, context: ToolContext) -> None:
        image_arg(context, arguments["image"])

    def run_batch(self, calls: list[tuple[dict, ToolContext]]) -> list[ToolResult]:
        by_k = _group_by_k(calls, self.cfg.default_k)
        results: list[ToolResult | None] = [None] * len(calls)
        for k, idx in by_k.items():
            images = [calls[i][1].images[calls[i][0]["image"]] for i in idx]
            found = self.backend.image_search(images, k, thumbnails=self.cfg.image_thumbnails)
            for i, hits in zip(idx, found):
                results[i] = self._format(hits, calls[i][1])
        return results  # type: ignore[return-value]

    def _format(self, hits: list[Hit], context: ToolContext) -> ToolResult:
        if not hits:
            return ToolResult("No similar images found.")
        lines, thumbs = [], []
        for rank, hit in enumerate(hits, 1):
            line = f"[{rank}] {hit.title}"
            if hit.thumbnail is not None:
                line += f" [image {new_image_number(context, len(thumbs))}]"
                thumbs.append(hit.thumbnail)
            if hit.text:
                line += f"\n{_snippet(hit.text, self.cfg.snippet_chars)}"
            lines.append(line)
        return ToolResult("\n\n".join(lines), images=thumbs)
