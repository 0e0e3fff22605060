"""`mmsearch mcp`: the agent's three tools over a local index dir, served to any MCP client.

It is the policy's toolbox behind the official `mcp` SDK's low-level `Server` (the low-level API,
so the input schemas listed are exactly the JSON schemas written here, not ones derived from
Python signatures): the same index dir, manifests and encoders, the same argument validation and
error messages, the same result text. Two things differ, because an MCP client is not the policy:

- MCP has no numbered list of the conversation's images, so `image` is the image itself: a base64
  PNG/JPEG string (a `data:` URL too) or an MCP image content object.
- `crop` boxes are in pixels of the image as given. There is no policy processor here and so no
  resize to undo; `tools.vision` is not used.

Results are MCP content: the tool's text, then its images (a crop; image_search's thumbnails, in
the order of the `[image n]` marks in the text). A bad call is a result with `isError` set and the
tool's error text; the server never raises into the protocol and keeps answering.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
from dataclasses import dataclass, field

import anyio
from mcp import types
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server
from PIL import Image

from tools.base import Tool, Toolbox, ToolContext, ToolInputError, ToolResult
from tools.config import ToolsConfig, VisionResizeConfig
from tools.registry import build_toolbox, open_backend
from tools.search.types import SearchBackend
from tools.server.codec import MAX_PIXELS, ImageDecodeError, decode_image, encode_image

logger = logging.getLogger(__name__)

TRANSPORTS = ("stdio", "http")
HTTP_PATH = "/mcp"

# A resize with factor 1 and no pixel bounds is the identity, so CropTool's checks and box mapping
# work in the pixels of the image as given.
GIVEN_PIXELS = VisionResizeConfig(patch_size=1, merge_size=1, min_pixels=1, max_pixels=MAX_PIXELS)
MAX_ASPECT = 200  # Qwen2-VL's smart_resize (which the crop geometry goes through) refuses more

IMAGE_SCHEMA = {
    "description": (
        "the image itself: a base64-encoded PNG or JPEG string (a data:image/...;base64, URL is accepted "
        'too), or an MCP image content object {"type": "image", "data": <base64>, "mimeType": "image/png"}'
    ),
    "anyOf": [
        {"type": "string"},
        {
            "type": "object",
            "properties": {"type": {"const": "image"}, "data": {"type": "string"}, "mimeType": {"type": "string"}},
            "required": ["data"],
        },
    ],
}
BBOX_SCHEMA = {
    "type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4,
    "description": "[x1, y1, x2, y2] in pixels of the image as given (its own width and height; no resize)",
}


@dataclass
class McpConfig:
    index: str = "runs/index"
    transport: str = "stdio"  # stdio | http (streamable HTTP)
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    # Thumbnails on: an MCP client shows them to a person, and LocalSearch reads them from the KB dir.
    tools: ToolsConfig = field(default_factory=lambda: ToolsConfig(image_thumbnails=True))


def decode_image_arg(value: str | dict) -> Image.Image:
    """The image an `image` argument holds; ToolInputError (with the tool server's message) if none."""
    data = value.get("data", "") if isinstance(value, dict) else value
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        return decode_image("".join(data.split()))  # base64 wrapped over lines is still base64
    except ImageDecodeError as exc:
        raise ToolInputError(f"image: {exc}") from None


class GivenImageTool(Tool):
    """A policy tool whose `image` argument is the image itself instead of its number in a conversation.

    Each MCP call gets a fresh context; `check` decodes the image into it as image 0 and the policy
    tool then checks and runs the call as `image=0`.
    """

    def __init__(self, inner: Tool, description: str, **properties: dict):
        self.inner, self.name, self.description = inner, inner.name, description
        params = inner.parameters
        self.parameters = {**params, "properties": {**params["properties"], "image": IMAGE_SCHEMA, **properties}}

    def check(self, arguments: dict, context: ToolContext) -> None:
        context.images = [decode_image_arg(arguments["image"])]
        self.inner.check({**arguments, "image": 0}, context)

    def run_batch(self, calls: list[tuple[dict, ToolContext]]) -> list[ToolResult]:
        return self.inner.run_batch([({**args, "image": 0}, ctx) for args, ctx in calls])


class GivenImageCrop(GivenImageTool):
    def check(self, arguments: dict, context: ToolContext) -> None:
        image = decode_image_arg(arguments["image"])
        if max(image.size) > MAX_ASPECT * min(image.size):
            raise ToolInputError(f"the image is {image.width}x{image.height}; crop takes aspect ratios up to {MAX_ASPECT}")
        context.images = [image]
        self.inner.check({**arguments, "image": 0}, context)

    def run_batch(self, calls: list[tuple[dict, ToolContext]]) -> list[ToolResult]:
        results = super().run_batch(calls)
        for (args, ctx), result in zip(calls, results):
            if not result.is_error:  # the policy's text names image numbers; say the box and sizes instead
                (image,), (crop,) = ctx.images, result.images
                result.text = (f"Cropped {[round(v) for v in args['bbox']]} of the {image.width}x{image.height} "
                               f"image -> a {crop.width}x{crop.height} image")
        return results


def mcp_toolbox(cfg: ToolsConfig, backend: SearchBackend | None) -> Toolbox:
    """The policy's tools (as `cfg.enabled` and the backend allow), with images passed in, for MCP."""
    # Like the tool server: a tool the index cannot back is not listed (LocalSearch says what it has).
    enabled = [name for name in cfg.enabled
               if (name != "text_search" or getattr(backend, "text_modes", True))
               and (name != "image_search" or getattr(backend, "has_image_search", True))]
    policy = build_toolbox(dataclasses.replace(cfg, enabled=enabled, vision=GIVEN_PIXELS), backend)
    policy.close()  # only its tools are kept; the MCP toolbox runs them
    tools: list[Tool] = []
    for name, tool in policy.tools.items():
        if name == "image_search":
            tool = GivenImageTool(tool, (
                "Reverse image search: find knowledge-base entries that look like an image. `image` is the image "
                "itself (base64 PNG/JPEG). Returns the top matches' titles and descriptions, then their thumbnails "
                "as images in the order of the [image n] marks."))
        elif name == "crop":
            tool = GivenImageCrop(tool, (
                "Crop a region of an image to look at it closely or to search for it. `image` is the image itself "
                "(base64 PNG/JPEG); `bbox` is [x1, y1, x2, y2] in pixels of that image as given (no resize). "
                "Returns the crop as an image."), bbox=BBOX_SCHEMA)
        tools.append(tool)
    return Toolbox(tools, timeout_s=cfg.timeout_s)


def to_mcp_result(result: ToolResult) -> types.CallToolResult:
    images = [types.ImageContent(data=encode_image(image), mime_type="image/png") for image in result.images]
    return types.CallToolResult(content=[types.TextContent(text=result.text), *images], is_error=result.is_error)


def call_tool(toolbox: Toolbox, name: str, arguments: dict | None) -> types.CallToolResult:
    """One MCP tool call through the toolbox; every failure is an error result, never an exception."""
    try:
        return to_mcp_result(toolbox.call(name, {} if arguments is None else arguments, ToolContext()))
    except Exception as exc:  # the Toolbox catches tool failures; this is for anything past it
        logger.exception("MCP call to %s failed", name)
        return to_mcp_result(ToolResult.error(f"{name} failed: {type(exc).__name__}: {exc}"))


def create_server(toolbox: Toolbox) -> Server:
    listed = [types.Tool(name=t.name, description=t.description, input_schema=t.parameters)
              for t in toolbox.tools.values()]

    async def on_list_tools(ctx, params) -> types.ListToolsResult:
        return types.ListToolsResult(tools=listed)

    async def on_call_tool(ctx, params: types.CallToolRequestParams) -> types.CallToolResult:
        # Encoders, FAISS and PNG coding are CPU work: off the event loop, so other requests keep flowing.
        return await anyio.to_thread.run_sync(call_tool, toolbox, params.name, params.arguments)

    return Server(
        "mmsearch", version=_version(),
        instructions="Search a local knowledge base by text or by image, and crop images to look closer.",
        on_list_tools=on_list_tools, on_call_tool=on_call_tool,
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mmsearch")
    except PackageNotFoundError:
        return ""


async def _serve_stdio(server: Server) -> None:
    async with stdio_server() as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())


def run_mcp(cfg: McpConfig) -> None:
    """`mmsearch mcp`: load the indexes in cfg.index and serve the tools until the client goes away."""
    if cfg.transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {cfg.transport!r}")
    # On stdio, stdout is the protocol's wire: whatever loading prints goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        backend = open_backend(cfg.index, [], cfg.tools, device=cfg.device)
    server = create_server(mcp_toolbox(cfg.tools, backend))
    if cfg.transport == "stdio":
        anyio.run(_serve_stdio, server)
        return
    import uvicorn

    from tools.server.app import LOOPBACK

    if cfg.host not in LOOPBACK:
        logger.warning("serving MCP on %s: anyone who can reach this address can query the index", cfg.host)
    # On loopback the SDK turns on DNS-rebinding protection (Host and Origin must be loopback too).
    app = server.streamable_http_app(streamable_http_path=HTTP_PATH, host=cfg.host)
    print(f"mmsearch MCP server (streamable HTTP) on http://{cfg.host}:{cfg.port}{HTTP_PATH}", file=sys.stderr)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False)
