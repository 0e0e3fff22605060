"""`mmsearch demo tools`: the three tools on a world scene, as the policy would call them."""

from __future__ import annotations

import json
from pathlib import Path

RULE = "─" * 72


def _show(call: str, result) -> None:
    print(f"{RULE}\n>>> {call}")
    print(result.text if len(result.text) < 1200 else result.text[:1200] + " …")


def demo_tools(args) -> int:
    from PIL import Image

    from tools.base import ToolContext
    from tools.config import ToolsConfig
    from tools.imaging import seen_size
    from tools.registry import build_toolbox
    from tools.search.local import LocalSearch

    kb = Path(args.kb)
    scene = json.loads((kb / "scenes.jsonl").read_text().splitlines()[0])
    entities = {e["id"]: e for e in map(json.loads, (kb / "entities.jsonl").read_text().splitlines())}
    cfg = ToolsConfig()
    toolbox = build_toolbox(cfg, LocalSearch(args.index, default_mode=cfg.text_mode))

    image = Image.open(kb / scene["path"]).convert("RGB")
    context = ToolContext([image])
    sw, sh = seen_size(image.width, image.height, cfg.vision)
    obj = scene["objects"][0]
    x1, y1, x2, y2 = obj["bbox"]
    bbox = [round(x1 * sw / image.width), round(y1 * sh / image.height),
            round(x2 * sw / image.width), round(y2 * sh / image.height)]
    truth = entities[obj["entity_id"]]
    print(f"scene {scene['path']} ({image.width}x{image.height}, seen as {sw}x{sh}); "
          f"the object at {obj['position']} is {truth['name']!r} ({truth['kind']})")

    cropped = toolbox.call("crop", {"image": 0, "bbox": bbox}, context)
    _show(f'crop(image=0, bbox={bbox})', cropped)
    context.images += cropped.images
    found = toolbox.call("image_search", {"image": 1, "k": 3}, context)
    _show("image_search(image=1, k=3)", found)

    relation, target = next(iter(truth["relations"].items()), (None, None))
    query = f"{truth['name']} {relation.replace('_', ' ')}" if relation else truth["name"]
    _show(f'text_search(query="{query}", k=3)', toolbox.call("text_search", {"query": query, "k": 3}))
    if target:
        print(f"(the KB says: {relation} of {truth['name']} is {entities[target]['name']})")

    _show('crop(image=0, bbox=[0, 0, 9999, 10])  # a bad call', toolbox.call("crop", {"image": 0, "bbox": [0, 0, 9999, 10]}, context))
    print(RULE)
    return 0
