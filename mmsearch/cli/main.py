"""The `mmsearch` command line. Parsing is cheap; each subcommand imports its heavy code lazily.

Every job subcommand takes `--config FILE` and trailing `key=value` overrides, and its own flags
(`--out`, `--seed`, ...) are shorthands for config keys.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# subcommand path -> "module:function" that runs it; imported only when chosen.
HANDLERS = {
    ("world", "build"): "mmsearch.cli.commands:world_build",
    ("clip", "train"): "mmsearch.cli.commands:clip_train",
    ("kb", "import"): "mmsearch.cli.kb_commands:kb_import",
    ("kb", "check"): "mmsearch.cli.kb_commands:kb_check",
    ("index", "build"): "mmsearch.cli.commands:index_build",
    ("search", "text"): "mmsearch.cli.commands:search_text",
    ("search", "image"): "mmsearch.cli.commands:search_image",
    ("serve",): "mmsearch.cli.commands:serve",
    ("mcp",): "mmsearch.cli.commands:mcp_serve",
    ("demo", "tools"): "mmsearch.cli.demo:demo_tools",
    ("model", "init-tiny"): "mmsearch.cli.agent_commands:model_init_tiny",
    ("eval",): "mmsearch.cli.agent_commands:eval_run",
    ("ask",): "mmsearch.cli.agent_commands:ask",
    ("app",): "mmsearch.cli.agent_commands:app_serve",
    ("synth",): "mmsearch.cli.data_commands:synth_run",
    ("sft",): "mmsearch.cli.agent_commands:sft_run",
    ("rl",): "mmsearch.cli.agent_commands:rl_run",
    ("compare",): "mmsearch.cli.agent_commands:compare_runs",
    ("synth-import",): "mmsearch.cli.data_commands:synth_import",
    ("eval-report",): "mmsearch.cli.agent_commands:eval_report",
}


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmsearch", description="Training stack for multimodal search agents.")
    sub = parser.add_subparsers(dest="command", required=True)

    world = sub.add_parser("world", help="the embedded generated world").add_subparsers(dest="action", required=True)
    p = world.add_parser("build", help="generate a KB dir (entities, images, articles, scenes)")
    p.add_argument("--out", help="KB dir to write")
    p.add_argument("--seed", type=int)
    p.add_argument("--entities", type=int, help="number of entities")
    _job_args(p)

    clip = sub.add_parser("clip", help="CLIP image encoder").add_subparsers(dest="action", required=True)
    p = clip.add_parser("train", help="train (or fine-tune) an open_clip model on a KB's images and titles")
    p.add_argument("--kb", help="KB dir")
    p.add_argument("--out", help="model dir to write")
    _job_args(p)

    kb = sub.add_parser("kb", help="bring your own knowledge base").add_subparsers(dest="action", required=True)
    p = kb.add_parser("import", help="import a FlashRAG/Search-R1 corpus (wiki-18) or a folder of captioned images "
                                     "into a KB dir, streaming")
    p.add_argument("--format", required=True, choices=["flashrag", "images"])
    p.add_argument("--corpus", help="flashrag: the corpus JSONL ({\"id\", \"contents\": \"Title\\nText\"} per line)")
    p.add_argument("--images", help="images: the folder of image files")
    p.add_argument("--captions", help="images: JSONL (file, caption, optional title, id) or CSV with those columns")
    p.add_argument("--out", required=True, help="KB dir to write (passages.jsonl or images.jsonl + images/)")
    p = kb.add_parser("check", help="what index build and synth would skip in a KB dir, and the multi-hop paths "
                                    "its entity graph offers")
    p.add_argument("kb", help="KB dir")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    index = sub.add_parser("index", help="search indexes").add_subparsers(dest="action", required=True)
    p = index.add_parser("build", help="build BM25, dense text and CLIP image indexes for a KB")
    p.add_argument("--kb", help="KB dir")
    p.add_argument("--out", help="index dir to write")
    _job_args(p)

    search = sub.add_parser("search", help="run a search tool from the shell").add_subparsers(dest="action", required=True)
    p = search.add_parser("text", help="text_search over the passage indexes")
    p.add_argument("query")
    p.add_argument("--k", type=int, help="number of results")
    p.add_argument("--mode", choices=["bm25", "dense", "hybrid"])
    _search_args(p)
    p = search.add_parser("image", help="image_search (reverse image search), optionally on a crop")
    p.add_argument("image", help="image file")
    p.add_argument("--bbox", help="x1,y1,x2,y2 in pixels of the image as the model sees it (after resize)")
    p.add_argument("--k", type=int, help="number of results")
    _search_args(p)

    p = sub.add_parser("serve", help="serve the search tools over HTTP (FastAPI)")
    p.add_argument("--index", help="index dir")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    _job_args(p)

    p = sub.add_parser("mcp", help="serve the three tools to MCP clients (stdio, or streamable HTTP on loopback)")
    p.add_argument("--index", help="index dir")
    p.add_argument("--transport", choices=["stdio", "http"], help="stdio (the default) or streamable HTTP")
    p.add_argument("--host", help="http: address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="http: port (default 8000)")
    _job_args(p)

    model = sub.add_parser("model", help="policies").add_subparsers(dest="action", required=True)
    p = model.add_parser("init-tiny", help="build the tiny Qwen2.5-VL policy (tokenizer trained on a KB)")
    p.add_argument("--kb", help="KB dir whose text trains the tokenizer")
    p.add_argument("--out", help="model + processor dir to write")
    p.add_argument("--text-only", action="store_true",
                   help="a text-only Qwen2 causal LM (tokenizer + model) instead, for text_search alone")
    _job_args(p)

    p = sub.add_parser("eval", help="run the agent over a split and report EM/F1, tool use and cost")
    p.add_argument("--data", help="dataset dir, JSONL/Parquet file (generic, InfoSeek, FVQA/MMSearch-R1, "
                                  "FlashRAG/Search-R1 QA), or a FlashRAG dir (one folder per dataset)")
    p.add_argument("--split")
    p.add_argument("--limit", type=int, help="first N examples")
    p.add_argument("--out", help="dir for trajectories.jsonl, summary.json, report.md, report.html, images/ "
                                 "(`mmsearch eval report DIR` re-renders report.html)")
    _policy_args(p)

    p = sub.add_parser("eval-report", help="the same as `mmsearch eval report`: (re)write an eval run's report.html")
    p.add_argument("run", help="eval run dir (trajectories.jsonl, summary.json, images/)")

    p = sub.add_parser("ask", help="ask the agent one question about an image and watch it work")
    p.add_argument("question")
    p.add_argument("--image", help="image file (a text-only policy takes none)")
    p.add_argument("--out", default="runs/ask", help="dir for the images tools return (crops)")
    p.add_argument("--json", action="store_true", help="print the trajectory as JSON")
    _policy_args(p)

    p = sub.add_parser("app", help="a web page (Gradio) to ask the agent about images and browse run trajectories")
    p.add_argument("--kb", help="KB dir whose scenes are the examples (default: the one the index was built from)")
    p.add_argument("--run", action="append", help="run dir offered in Browse (repeat; runs/ is searched too)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; anything else is reachable "
                                                       "by others, with no login)")
    p.add_argument("--port", type=int, default=7860)
    _policy_args(p)

    p = sub.add_parser("synth", help="synthesize a multi-hop VQA dataset with gold tool-use trajectories "
                                     "(`mmsearch synth import` converts InfoSeek-style records)")
    p.add_argument("--kb", help="KB dir with entities.jsonl")
    p.add_argument("--index", help="index dir (in-process search)")
    p.add_argument("--server", action="append", help="tool-server URL (repeat for replicas)")
    p.add_argument("--out", help="dataset dir to write (an interrupted run there resumes)")
    p.add_argument("--n", type=int, help="examples over all splits")
    p.add_argument("--seed", type=int)
    p.add_argument("--trajectories", choices=["gold", "teacher", "none"])
    p.add_argument("--processor", help="policy dir whose image resize the crop boxes assume")
    p.add_argument("--push-format", choices=["sharegpt"], help="also write this export format")
    _job_args(p)
    p = sub.add_parser("synth-import", help="the same as `mmsearch synth import`: InfoSeek-style records to a dataset dir")
    p.add_argument("--records", help="JSONL file(s), comma-separated")
    p.add_argument("--image-root", help="dir holding <image_id>.jpg")
    p.add_argument("--out", help="dataset dir to write")
    p.add_argument("--seed", type=int)
    _job_args(p)

    p = sub.add_parser("sft", help="cold-start SFT of the policy on gold trajectories (one process, torchrun or deepspeed)")
    p.add_argument("--model", help="policy dir to start from")
    p.add_argument("--data", help="dataset dir from `mmsearch synth`")
    p.add_argument("--out", help="run dir: checkpoints, metrics.jsonl, tensorboard/, curves.png")
    p.add_argument("--index", help="index dir for the periodic eval's tools")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    _job_args(p)

    p = sub.add_parser("rl", help="RL (GRPO family, PPO) on live multi-turn rollouts with the tools "
                                   "(one process or torchrun)")
    p.add_argument("--model", help="policy dir to start from (an SFT final/ or a base checkpoint)")
    p.add_argument("--data", help="dataset dir from `mmsearch synth` (train split; validation for eval)")
    p.add_argument("--out", help="run dir: checkpoints, metrics.jsonl, tensorboard/, curves.png, trajectories/")
    p.add_argument("--index", help="index dir (in-process tools)")
    p.add_argument("--server", action="append", help="tool-server URL (repeat for replicas)")
    p.add_argument("--steps", type=int, help="RL steps")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    _job_args(p)

    p = sub.add_parser("compare", help="side-by-side table of eval runs (e.g. before and after RL)")
    p.add_argument("runs", nargs="+", help="eval run dirs (each with summary.json)")
    p.add_argument("--labels", help="comma-separated names for the runs (default: the dir names)")

    demo = sub.add_parser("demo", help="show the stack on the embedded world").add_subparsers(dest="action", required=True)
    p = demo.add_parser("tools", help="crop, image_search and text_search on a world scene")
    p.add_argument("--kb", required=True, help="KB dir (the world)")
    p.add_argument("--index", required=True, help="index dir")
    return parser


def _policy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="policy dir (local hf engine) or an OpenAI-compatible URL")
    p.add_argument("--api-base", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--served-model", help="model name at the endpoint")
    p.add_argument("--index", help="index dir (in-process search)")
    p.add_argument("--server", action="append", help="tool-server URL (repeat for replicas)")
    p.add_argument("--protocol", help="what the policy speaks: qwen_tools (default), search_r1, r1_searcher, mmsearch_r1; "
                                      "enables the protocol's tools unless tools.enabled is given")
    _job_args(p)


def _search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", help="index dir (in-process search)")
    p.add_argument("--server", action="append", help="tool-server URL (repeat for replicas)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _job_args(p)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["synth", "import"]:  # `synth` itself takes key=value positionals, so `import` is routed here
        argv = ["synth-import", *argv[2:]]
    if argv[:2] == ["eval", "report"]:  # likewise for `eval report`
        argv = ["eval-report", *argv[2:]]
    # key=value overrides may come after options (argparse only collects them right after the positionals).
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bm25s").setLevel(logging.WARNING)  # it sets itself to DEBUG
    # transformers warns that a sliding window is "not implemented" for any attention but flash; its
    # masks do implement it for sdpa and eager (the tiny policy's layer 0; tests/test_engine_cache.py).
    logging.getLogger("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl").addFilter(
        lambda record: "Sliding Window Attention is enabled but not implemented" not in record.getMessage())
    # Our jobs show their own progress; per-file weight-loading bars from the hub libraries are noise.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    key = tuple(part for part in (args.command, getattr(args, "action", None)) if part)
    module_name, func_name = HANDLERS[key].split(":")
    handler = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(handler(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        # Config errors, bad KB or index dirs, encoder mismatches: the message is the fix; a traceback is noise.
        print(f"mmsearch: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
