"""Handlers for the policy side: `model init-tiny`, `eval` and `ask`."""

from __future__ import annotations

import sys
from pathlib import Path

from mmsearch.cli.commands import _load
from mmsearch.config import to_yaml


def model_init_tiny(args) -> int:
    from mmsearch.model.tiny import TinyPolicyConfig, init_tiny

    cfg = _load(TinyPolicyConfig, args, kb=args.kb, out=args.out)
    out = init_tiny(cfg)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out)
    print(f"wrote {out}: {config.model_type}, vocab {config.text_config.vocab_size}, "
          f"{config.text_config.num_hidden_layers} layers x {config.text_config.hidden_size}, "
          f"vision depth {config.vision_config.depth}")
    return 0


def _engine_flags(args) -> dict:
    """`--model DIR` runs it locally (hf); `--model URL` or `--api-base URL` uses an OpenAI-compatible endpoint."""
    from mmsearch.agent.setup import is_url

    flags = {"index": args.index, "server": args.server}
    api_base = args.api_base or (args.model if args.model and is_url(args.model) else None)
    if api_base:
        flags.update({"engine.kind": "openai", "engine.api_base": api_base, "engine.model": args.served_model or "default"})
    elif args.model:
        flags["engine.model"] = args.model
    return flags


def eval_run(args) -> int:
    from mmsearch.eval.report import markdown
    from mmsearch.eval.run import EvalConfig, run_eval

    cfg = _load(EvalConfig, args, data=args.data, split=args.split, limit=args.limit, out=args.out, **_engine_flags(args))
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    Path(cfg.out, "eval_config.yaml").write_text(to_yaml(cfg))
    summary = run_eval(cfg)
    print(markdown(summary))
    print(f"wrote {cfg.out}/trajectories.jsonl, summary.json, report.md")
    return 0


def ask(args) -> int:
    from PIL import Image, UnidentifiedImageError

    from mmsearch.agent.setup import build_loop
    from mmsearch.cli.ask_view import AskPrinter
    from mmsearch.eval.run import EvalConfig
    from mmsearch.example import Example

    cfg = _load(EvalConfig, args, **_engine_flags(args))  # eval configs work for ask too (data keys unused)
    try:
        with Image.open(args.image) as img:
            image = img.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        print(f"mmsearch: error: cannot read image {args.image}: {exc}", file=sys.stderr)
        return 2
    printer = AskPrinter(Path(args.out), as_json=args.json)
    loop = build_loop(cfg, on_event=printer.on_event)
    printer.start(args.question, args.image)
    [traj] = loop.run([Example("ask", args.question, [image], answers=[])])
    printer.finish(traj)
    return 0  # the run worked even without an answer; stop_reason says how it ended


def sft_run(args) -> int:
    from mmsearch.eval.report import markdown
    from mmsearch.sft.config import SFTConfig
    from mmsearch.sft.train import train_sft

    cfg = _load(SFTConfig, args, model=args.model, data=args.data, out=args.out, **{"eval.index": args.index})
    result = train_sft(cfg, resume=args.resume)
    if "curves" not in result:
        return 0  # not rank 0
    if result["eval"]:
        print(markdown(result["eval"]))
    print(f"wrote {result['final']} ({result['steps']} steps, {result['trained_tokens']} trained tokens, "
          f"{result['train_s']:.0f} s training); curves: {result['curves']}")
    return 0


def rl_run(args) -> int:
    from mmsearch.eval.report import markdown
    from mmsearch.rl.config import RLConfig
    from mmsearch.rl.guard import Collapsed
    from mmsearch.rl.train import train_rl

    cfg = _load(RLConfig, args, model=args.model, data=args.data, out=args.out, index=args.index,
                server=args.server, steps=args.steps)
    try:
        result = train_rl(cfg, resume=args.resume)
    except Collapsed as exc:
        print(f"mmsearch rl: {exc}", file=sys.stderr)
        return 3
    if "curves" not in result:
        return 0  # not rank 0
    if result["eval"]:
        print(markdown(result["eval"]))
    print(f"wrote {result['final']} ({result['steps']} steps, {result['train_s']:.0f} s); curves: {result['curves']}")
    return 0


def compare_runs(args) -> int:
    import json

    from mmsearch.eval.report import compare

    labels = args.labels.split(",") if args.labels else [Path(r).name for r in args.runs]
    if len(labels) != len(args.runs):
        raise ValueError(f"--labels names {len(labels)} runs but {len(args.runs)} were given")
    summaries = {}
    for label, run in zip(labels, args.runs):
        path = Path(run) / "summary.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: pass dirs written by `mmsearch eval`")
        summaries[label] = json.loads(path.read_text())
    print(compare(summaries))
    return 0
