"""The three tools over a real index: good calls answer, every kind of bad call is an error result."""

import json
import math
import time

import pytest
from PIL import Image

from tools.base import ToolCall, ToolContext, ToolResult
from tools.config import ToolsConfig, VisionResizeConfig
from tools.imaging import seen_size
from tools.registry import build_toolbox
from tools.search.local import LocalSearch

VISION = VisionResizeConfig(max_pixels=28 * 28 * 256)


@pytest.fixture(scope="module")
def scene(world_dir):
    record = json.loads((world_dir / "scenes.jsonl").read_text().splitlines()[0])
    return Image.open(world_dir / record["path"]).convert("RGB"), record


@pytest.fixture(scope="module")
def toolbox(search):
    return build_toolbox(ToolsConfig(vision=VISION), search)


def test_schemas_are_function_specs(toolbox):
    names = [s["function"]["name"] for s in toolbox.schemas()]
    assert names == ["text_search", "image_search", "crop"]
    for schema in toolbox.schemas():
        assert schema["type"] == "function" and schema["function"]["parameters"]["type"] == "object"


def test_text_search_finds_the_entity_article(toolbox, world_dir):
    entity = json.loads((world_dir / "entities.jsonl").read_text().splitlines()[0])
    result = toolbox.call("text_search", {"query": entity["name"], "k": 3})
    assert not result.is_error
    assert entity["name"] in result.text.split("\n")[0]  # the top hit's title names the entity
    assert result.text.startswith("[1] ") and "[3] " in result.text


def test_image_search_on_a_kb_image_returns_it_first(toolbox, world_dir):
    record = json.loads((world_dir / "images.jsonl").read_text().splitlines()[0])
    image = Image.open(world_dir / record["path"]).convert("RGB")
    result = toolbox.call("image_search", {"image": 0}, ToolContext([image]))
    assert not result.is_error
    assert result.text.split("\n")[0] == f"[1] {record['title']}"


def test_crop_then_search_the_crop(toolbox, scene):
    image, record = scene
    obj = record["objects"][0]
    sw, sh = seen_size(image.width, image.height, VISION)
    x1, y1, x2, y2 = obj["bbox"]
    bbox = [x1 * sw / image.width, y1 * sh / image.height, x2 * sw / image.width, y2 * sh / image.height]
    context = ToolContext([image])
    cropped = toolbox.call("crop", {"image": 0, "bbox": bbox}, context)
    assert not cropped.is_error and cropped.text.endswith("[image 1]")
    context.images += cropped.images
    found = toolbox.call("image_search", {"image": 1, "k": 5}, context)
    assert not found.is_error and found.text.count("\n[") >= 1


def _scene_bad_calls(width, height):
    nan, inf = math.nan, math.inf
    return [
        # (case, tool, arguments, expected text in the error)
        ("unknown tool", "web_search", {"query": "x"}, "unknown tool 'web_search'; available tools: text_search, image_search, crop"),
        ("arguments as a string", "text_search", '{"query": "x"}', "must be a JSON object, got str"),
        ("arguments as a list", "text_search", ["x"], "must be a JSON object, got list"),
        ("arguments null", "text_search", None, "must be a JSON object, got NoneType"),
        ("missing query", "text_search", {}, "'query' is a required property"),
        ("extra argument", "text_search", {"query": "x", "lang": "en"}, "'lang' was unexpected"),
        ("query not a string", "text_search", {"query": 5}, "5 is not of type 'string'"),
        ("k as a string", "text_search", {"query": "x", "k": "3"}, "k: '3' is not of type 'integer'"),
        ("k as a bool", "text_search", {"query": "x", "k": True}, "k: True is not of type 'integer'"),
        ("k zero", "text_search", {"query": "x", "k": 0}, "k: 0 is less than the minimum of 1"),
        ("k too large", "text_search", {"query": "x", "k": 1000}, "k: 1000 is greater than the maximum of 10"),
        ("empty query", "text_search", {"query": "   "}, "query is empty"),
        ("huge query", "text_search", {"query": "a" * 5000}, "query is 5000 characters; the limit is 512"),
        ("image out of range", "image_search", {"image": 3}, "image 3 does not exist; images in this conversation are numbered 0 to 0"),
        ("negative image", "image_search", {"image": -1}, "-1 is less than the minimum of 0"),
        ("image as a path", "image_search", {"image": "/tmp/x.png"}, "is not of type 'integer'"),
        ("crop x2 beyond width", "crop", {"image": 0, "bbox": [0, 0, width + 100, 10]},
         f"bbox x2={width + 100} exceeds image width {width}"),
        ("crop y2 beyond height", "crop", {"image": 0, "bbox": [0, 0, 10, height + 1]},
         f"bbox y2={height + 1} exceeds image height {height}"),
        ("crop negative", "crop", {"image": 0, "bbox": [-5, 0, 10, 10]}, "bbox x1=-5 is negative"),
        ("crop reversed", "crop", {"image": 0, "bbox": [50, 50, 10, 10]}, "is empty or reversed"),
        ("crop zero width", "crop", {"image": 0, "bbox": [10, 10, 10, 40]}, "is empty or reversed"),
        ("crop too small", "crop", {"image": 0, "bbox": [10, 10, 12, 40]}, "each side must be at least 4 px"),
        ("crop NaN", "crop", {"image": 0, "bbox": [nan, 0, 10, 10]}, "bbox x1 is nan; coordinates must be finite"),
        ("crop infinity", "crop", {"image": 0, "bbox": [0, 0, inf, 10]}, "bbox x2 is inf"),
        ("crop three numbers", "crop", {"image": 0, "bbox": [1, 2, 3]}, "is too short"),
        ("crop five numbers", "crop", {"image": 0, "bbox": [1, 2, 3, 4, 5]}, "is too long"),
        ("crop bbox as a string", "crop", {"image": 0, "bbox": "1,2,3,4"}, "is not of type 'array'"),
        ("crop bbox of strings", "crop", {"image": 0, "bbox": ["1", "2", "3", "4"]}, "is not of type 'number'"),
        ("crop missing bbox", "crop", {"image": 0}, "'bbox' is a required property"),
        ("crop image out of range", "crop", {"image": 7, "bbox": [0, 0, 10, 10]}, "image 7 does not exist"),
    ]


def test_every_bad_call_is_an_error_result(toolbox, scene):
    image, _ = scene
    width, height = seen_size(image.width, image.height, VISION)
    rows = _scene_bad_calls(width, height)
    results = toolbox.call_batch([ToolCall(tool, args, ToolContext([image])) for _, tool, args, _ in rows])
    for (case, _, _, expected), result in zip(rows, results):
        assert isinstance(result, ToolResult), case
        assert result.is_error and result.text.startswith("Error: "), case
        assert expected in result.text, f"{case}: {result.text}"


def test_no_images_in_the_conversation(toolbox):
    result = toolbox.call("image_search", {"image": 0}, ToolContext([]))
    assert result.is_error and "there are no images in this conversation" in result.text


def test_batch_keeps_order_with_good_and_bad_calls_mixed(toolbox, scene):
    image, _ = scene
    calls = [
        ToolCall("text_search", {"query": "capital"}),
        ToolCall("crop", {"image": 0, "bbox": [0, 0, 1, 1]}, ToolContext([image])),
        ToolCall("text_search", {"query": "river", "k": 2}),
        ToolCall("nope", {}),
    ]
    results = toolbox.call_batch(calls)
    assert [r.is_error for r in results] == [False, True, False, True]
    assert results[2].text.count("\n\n[") == 1  # k=2: two passages


class _SlowBackend:
    """A real index behind a deliberately slow link, to exercise the timeout path."""

    def __init__(self, backend, delay_s):
        self.backend, self.delay_s = backend, delay_s
        self.fingerprint = backend.fingerprint

    def text_search(self, queries, k, mode=None):
        time.sleep(self.delay_s)
        return self.backend.text_search(queries, k, mode)

    def image_search(self, images, k, thumbnails=False):
        time.sleep(self.delay_s)
        return self.backend.image_search(images, k, thumbnails)


def test_backend_timeout_is_an_error_result(search):
    toolbox = build_toolbox(ToolsConfig(timeout_s=0.2, enabled=["text_search"]), _SlowBackend(search, 1.0))
    result = toolbox.call("text_search", {"query": "capital"})
    assert result.is_error and "timed out after 0.2s" in result.text


def test_failing_backend_is_an_error_result(text_index_dir):
    toolbox = build_toolbox(ToolsConfig(), LocalSearch(text_index_dir, device="cpu"))
    result = toolbox.call("image_search", {"image": 0}, ToolContext([Image.new("RGB", (64, 64))]))
    assert result.is_error and "has no image index" in result.text


def test_thumbnails_are_numbered_new_images(search, world_dir):
    record = json.loads((world_dir / "images.jsonl").read_text().splitlines()[0])
    image = Image.open(world_dir / record["path"]).convert("RGB")
    toolbox = build_toolbox(ToolsConfig(image_thumbnails=True, enabled=["image_search"]), search)
    result = toolbox.call("image_search", {"image": 0, "k": 2}, ToolContext([image]))
    assert len(result.images) == 2
    assert "[image 1]" in result.text and "[image 2]" in result.text
