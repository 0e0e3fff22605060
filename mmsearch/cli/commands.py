"""Handlers of the `mmsearch` subcommands. Each imports what it needs when it runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mmsearch.config import load_config, to_yaml


def _load(schema, args, **flags):
    return load_config(schema, args.config, flags, args.overrides)


def world_build(args) -> int:
    from data_pipeline.world import WorldConfig, build_world

    cfg = _load(WorldConfig, args, out=args.out, seed=args.seed, entities=args.entities)
    summary = build_world(cfg)
    print(json.dumps(summary, indent=2))
    return 0


def clip_train(args) -> int:
    from tools.encoders.clip_train import ClipTrainConfig, train_clip

    cfg = _load(ClipTrainConfig, args, kb=args.kb, out=args.out)
    report = train_clip(cfg)
    print(json.dumps(report, indent=2))
    return 0


def index_build(args) -> int:
    from tools.config import IndexBuildConfig
    from tools.index.build import build_indexes

    cfg = _load(IndexBuildConfig, args, kb=args.kb, out=args.out)
    built = build_indexes(cfg)
    Path(cfg.out, "build_config.yaml").write_text(to_yaml(cfg))
    for kind, manifest in built.items():
        print(f"{kind:6s} {manifest['count']:>8d} records  encoder={manifest['encoder']}  "
              f"faiss={manifest['faiss_factory'] or '-'}  {manifest['build_seconds']:.1f}s")
    return 0


def _backend(cfg):
    from tools.registry import open_backend

    return open_backend(cfg.index, cfg.server, cfg.tools, device=cfg.device)


def _search_config(args):
    from tools.config import SearchConfig

    flags = {"index": args.index, "server": args.server, "tools.text_mode": getattr(args, "mode", None)}
    return _load(SearchConfig, args, **flags)


def _print_result(call: dict, result, as_json: bool) -> int:
    if as_json:
        print(json.dumps({**call, "is_error": result.is_error, "text": result.text}, ensure_ascii=False))
    else:
        print(result.text)
    return 1 if result.is_error else 0


def search_text(args) -> int:
    from tools.registry import build_toolbox

    cfg = _search_config(args)
    cfg.tools.enabled = ["text_search"]
    toolbox = build_toolbox(cfg.tools, _backend(cfg))
    arguments = {"query": args.query, **({"k": args.k} if args.k is not None else {})}
    return _print_result({"tool": "text_search", "arguments": arguments}, toolbox.call("text_search", arguments), args.json)


def search_image(args) -> int:
    from PIL import Image, UnidentifiedImageError

    from tools.base import ToolContext
    from tools.registry import build_toolbox

    cfg = _search_config(args)
    try:
        with Image.open(args.image) as img:
            context = ToolContext(images=[img.convert("RGB")])
    except (OSError, UnidentifiedImageError) as exc:
        print(f"Error: cannot read image {args.image}: {exc}", file=sys.stderr)
        return 2
    cfg.tools.enabled = ["image_search", "crop"]
    toolbox = build_toolbox(cfg.tools, _backend(cfg))
    image_number = 0
    if args.bbox:
        try:
            bbox = [float(v) for v in args.bbox.split(",")]
        except ValueError:
            print(f"Error: --bbox must be four numbers x1,y1,x2,y2, got {args.bbox!r}", file=sys.stderr)
            return 2
        cropped = toolbox.call("crop", {"image": 0, "bbox": bbox}, context)
        if cropped.is_error:
            return _print_result({"tool": "crop", "arguments": {"image": 0, "bbox": bbox}}, cropped, args.json)
        if not args.json:
            print(cropped.text)
        context.images += cropped.images
        image_number = 1
    arguments = {"image": image_number, **({"k": args.k} if args.k is not None else {})}
    result = toolbox.call("image_search", arguments, context)
    return _print_result({"tool": "image_search", "arguments": arguments}, result, args.json)


def serve(args) -> int:
    from tools.config import ServeConfig
    from tools.server.app import run_server

    cfg = _load(ServeConfig, args, index=args.index, host=args.host, port=args.port)
    run_server(cfg)
    return 0


def mcp_serve(args) -> int:
    from tools.mcp_server import McpConfig, run_mcp

    cfg = _load(McpConfig, args, index=args.index, transport=args.transport, host=args.host, port=args.port)
    run_mcp(cfg)
    return 0
