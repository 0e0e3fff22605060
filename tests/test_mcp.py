"""`mmsearch mcp` over stdio, driven by the MCP SDK's own client against a real server process on a real index."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import json
import os
import sys
import threading
from pathlib import Path

import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


class StdioMcpClient:
    """The SDK's stdio client and ClientSession on a background event loop, so sync tests share one server."""

    def __init__(self, params: StdioServerParameters, start_timeout_s: float = 300):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="mcp-client", daemon=True)
        self.thread.start()
        self._ready: concurrent.futures.Future = concurrent.futures.Future()
        self._stop: asyncio.Event | None = None
        self._main = asyncio.run_coroutine_threadsafe(self._hold(params), self.loop)
        self.session: ClientSession = self._ready.result(timeout=start_timeout_s)

    async def _hold(self, params: StdioServerParameters) -> None:
        # The transport's task group must be entered and left by one task: this one, for the session's life.
        try:
            self._stop = asyncio.Event()
            async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
                await session.initialize()
                self._ready.set_result(session)
                await self._stop.wait()
        except BaseException as exc:
            if not self._ready.done():
                self._ready.set_exception(exc)
            raise

    def run(self, coro, timeout_s: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout_s)

    def call(self, name: str, arguments: dict | None):
        return self.run(self.session.call_tool(name, arguments))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        try:
            self._main.result(timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(index_dir: Path):
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "mmsearch.cli.main", "mcp", "--index", str(index_dir), "device=cpu"],
        cwd=str(REPO),
        env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
    )
    client = StdioMcpClient(params)
    yield client
    client.close()


def b64_png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decoded(content) -> Image.Image:
    assert content.type == "image" and content.mime_type == "image/png"
    return Image.open(io.BytesIO(base64.b64decode(content.data)))


@pytest.fixture(scope="module")
def kb_image(world_dir: Path) -> tuple[Image.Image, dict]:
    record = json.loads((world_dir / "images.jsonl").read_text().splitlines()[0])
    return Image.open(world_dir / record["path"]).convert("RGB"), record


def test_lists_the_three_tools_with_their_schemas(client):
    tools = {tool.name: tool for tool in client.run(client.session.list_tools()).tools}
    assert list(tools) == ["text_search", "image_search", "crop"]
    text = tools["text_search"].input_schema
    assert text["required"] == ["query"] and text["properties"]["k"]["maximum"] == 10  # the policy's schema
    for name, required in (("image_search", ["image"]), ("crop", ["image", "bbox"])):
        schema = tools[name].input_schema
        assert schema["type"] == "object" and schema["required"] == required
        assert "base64" in schema["properties"]["image"]["description"]
        assert {"type": "string"} in schema["properties"]["image"]["anyOf"]
    assert "no resize" in tools["crop"].input_schema["properties"]["bbox"]["description"]


def test_text_search_finds_the_entity(client, world_dir):
    entity = json.loads((world_dir / "entities.jsonl").read_text().splitlines()[0])
    result = client.call("text_search", {"query": entity["name"], "k": 3})
    assert not result.is_error
    [content] = result.content
    assert content.type == "text" and content.text.startswith("[1] ") and "[3] " in content.text
    assert entity["name"] in content.text.split("\n")[0]  # the top hit's title names the entity


def test_image_search_finds_its_own_entry_with_thumbnails(client, kb_image):
    image, record = kb_image
    for image_arg in (b64_png(image), {"type": "image", "data": b64_png(image), "mimeType": "image/png"}):
        result = client.call("image_search", {"image": image_arg, "k": 2})
        assert not result.is_error
        text, *thumbs = result.content
        assert text.text.split("\n")[0] == f"[1] {record['title']} [image 1]"
        assert "[image 2]" in text.text and len(thumbs) == 2
        assert max(decoded(thumbs[0]).size) <= 96


def test_crop_is_in_the_given_pixels(client, kb_image):
    image, _ = kb_image
    bbox = [10, 20, 10 + 37, 20 + 23]
    result = client.call("crop", {"image": "data:image/png;base64," + b64_png(image), "bbox": bbox})
    assert not result.is_error
    text, content = result.content
    assert text.text == f"Cropped {bbox} of the {image.width}x{image.height} image -> a 37x23 image"
    crop = decoded(content)
    assert crop.size == (37, 23)
    assert crop.convert("RGB").tobytes() == image.crop(tuple(bbox)).tobytes()


def test_bad_calls_are_error_results_and_the_server_keeps_answering(client, kb_image):
    image, _ = kb_image
    png = b64_png(image)
    corrupt = base64.b64encode(base64.b64decode(png)[:200]).decode("ascii")  # a truncated PNG
    bad = [
        ("unknown tool", "web_search", {"query": "x"}, "unknown tool 'web_search'; available tools: text_search, image_search, crop"),
        ("no arguments", "text_search", None, "'query' is a required property"),
        ("missing image", "crop", {"bbox": [0, 0, 8, 8]}, "'image' is a required property"),
        ("k out of range", "text_search", {"query": "x", "k": 11}, "k: 11 is greater than the maximum of 10"),
        ("empty query", "text_search", {"query": "  "}, "query is empty"),
        ("malformed base64", "image_search", {"image": "not base64!"}, "image_search: image: not valid base64"),
        ("not an image", "image_search", {"image": base64.b64encode(b"hello").decode()}, "not a PNG/JPEG image"),
        ("corrupt image", "crop", {"image": corrupt, "bbox": [0, 0, 8, 8]}, "not a readable PNG/JPEG image"),
        ("image as a number", "image_search", {"image": 0}, "is not valid under any of the given schemas"),
        ("bbox out of the image", "crop", {"image": png, "bbox": [0, 0, image.width + 1, 8]},
         f"bbox x2={image.width + 1} exceeds image width {image.width}"),
        ("reversed bbox", "crop", {"image": png, "bbox": [20, 0, 10, 8]}, "empty or reversed"),
        ("short bbox", "crop", {"image": png, "bbox": [0, 0, 8]}, "is too short"),
        ("thin image", "crop", {"image": b64_png(Image.new("RGB", (2010, 10))), "bbox": [0, 0, 8, 8]},
         "the image is 2010x10; crop takes aspect ratios up to 200"),
    ]
    for case, name, arguments, expected in bad:
        result = client.call(name, arguments)
        assert result.is_error, case
        [content] = result.content
        assert content.text.startswith("Error: ") and expected in content.text, (case, content.text)
        assert not client.call("text_search", {"query": "capital", "k": 1}).is_error, case  # still answering


def test_streamable_http_transport_serves_the_same_tools(kb_image):
    """The `--transport http` app, in-process on loopback, with crop only (it needs no index)."""
    from mcp.client.streamable_http import streamable_http_client

    from tools.config import ToolsConfig
    from tools.mcp_server import HTTP_PATH, create_server, mcp_toolbox
    from tools.server.app import BackgroundServer

    image, _ = kb_image
    app = create_server(mcp_toolbox(ToolsConfig(enabled=["crop"]), None)).streamable_http_app(
        streamable_http_path=HTTP_PATH, host="127.0.0.1")

    async def session_calls(url: str):
        async with streamable_http_client(url) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            names = [tool.name for tool in (await session.list_tools()).tools]
            good = await session.call_tool("crop", {"image": b64_png(image), "bbox": [0, 0, 16, 12]})
            bad = await session.call_tool("crop", {"image": b64_png(image), "bbox": [0, 0, 2, 2]})
            return names, good, bad

    with BackgroundServer(app) as server:
        names, good, bad = asyncio.run(session_calls(server.url + HTTP_PATH))
    assert names == ["crop"]
    assert not good.is_error and decoded(good.content[1]).size == (16, 12)
    assert bad.is_error and "each side must be at least 4 px" in bad.content[0].text
