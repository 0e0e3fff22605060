"""Handlers for the policy side: `model init-tiny`, `eval` and `ask`."""

from __future__ import annotations

import sys
from pathlib import Path

from mmsearch.cli.commands import _load
from mmsearch.config import to_yaml


def model_init_tiny(args) -> int:
    from mmsearch.model.tiny import TinyPolicyConfig, init_tiny

    cfg = _load(TinyPolicyConfig, args, kb=args.kb, out=args.out, text_only=args.text_only or None)
    out = init_tiny(cfg)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out)
    text = config.get_text_config()
    vision = "text-only" if cfg.text_only else f"vision depth {config.vision_config.depth}"
    print(f"wrote {out}: {config.model_type}, vocab {text.vocab_size}, {text.num_hidden_layers} layers x "
          f"{text.hidden_size}, {vision}")
    return 0


def _engine_flags(args) -> dict:
    """`--model DIR` runs it locally (hf); `--model URL` or `--api-base URL` uses an OpenAI-compatible endpoint;
    `--protocol` picks what the policy speaks (and, unless `tools.enabled=` is given, the tools it has actions for)."""
    from mmsearch.agent.setup import is_url

    flags = {"index": args.index, "server": args.server}
    if args.protocol:
        from mmsearch.protocols import get_protocol

        protocol = get_protocol(args.protocol)
        flags["agent.protocol"] = protocol.name
        if protocol.tools and not any(o.startswith("tools.enabled=") for o in args.overrides):
            flags["tools.enabled"] = list(protocol.tools)
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
    # again: building the loop set the crop tool's resize from the policy's processor (what its boxes mean)
    Path(cfg.out, "eval_config.yaml").write_text(to_yaml(cfg))
    print(markdown(summary))
    print(f"wrote {cfg.out}/trajectories.jsonl, summary.json, report.md, report.html, images/")
    return 0


def eval_report(args) -> int:
    from mmsearch.eval.render import write_html_report

    run = Path(args.run)
    for name in ("trajectories.jsonl", "summary.json"):
        if not (run / name).is_file():
            raise FileNotFoundError(f"{run / name} not found: pass a dir written by `mmsearch eval`")
    path = write_html_report(run)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def ask(args) -> int:
    from mmsearch.agent.api import Agent, load_image
    from mmsearch.agent.setup import policy_is_text_only
    from mmsearch.cli.ask_view import AskPrinter
    from mmsearch.eval.run import EvalConfig
    from mmsearch.model.policy import images_refused

    cfg = _load(EvalConfig, args, **_engine_flags(args))  # eval configs work for ask too (data keys unused)
    # before loading the policy: a bad image fails fast (ValueError: exit 2); a text-only policy takes none
    image = load_image(args.image) if args.image else None
    if image is not None and policy_is_text_only(cfg.engine):
        raise images_refused(1)
    agent = Agent.from_pretrained(config=cfg)
    printer = AskPrinter(Path(args.out), as_json=args.json)
    printer.start(args.question, args.image)
    for event in agent.stream(image, args.question):
        printer.show(event)
    return 0  # the run worked even without an answer; stop_reason says how it ended


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def app_serve(args) -> int:
    from mmsearch.app import ask as asking
    from mmsearch.app.browse import find_runs
    from mmsearch.app.policies import Policies, pretrained_factory
    from mmsearch.eval.run import EvalConfig

    policy = args.api_base or args.model
    if not policy:
        raise ValueError("mmsearch app needs a policy: --model DIR, or --api-base URL (with --served-model NAME)")
    if not (args.index or args.server):
        raise ValueError("mmsearch app needs the policy's tools: --index DIR (or --server URL)")
    cfg = _load(EvalConfig, args, **_engine_flags(args))  # eval configs work here too (data keys unused)
    if not args.config:
        cfg.agent.sampling.temperature = 0.0  # the page starts greedy (reproducible); its slider changes it
    policies = Policies(pretrained_factory(cfg))
    print(f"loading {policy} ...", flush=True)
    policies.get(policy)  # a bad --model fails here, before the page is up (UserError: exit 2)
    kb = Path(args.kb) if args.kb else asking.kb_of_index(cfg.index if not cfg.server else None)
    examples = asking.scene_examples(kb)
    runs = list(args.run or []) + [r for r in find_runs("runs") if r not in (args.run or [])]
    finals = sorted(str(p.parent) for p in Path("runs").glob("*/*/final/config.json"))  # other policies to pick
    if args.host not in LOOPBACK:
        print(f"mmsearch app: WARNING: serving on {args.host}, not loopback: anyone who can reach port {args.port} "
              "can run the policy on this machine and open run dirs here; there is no login.", file=sys.stderr)
    from mmsearch.app.ui import build_app, serve

    app = build_app(policies, default_policy=policy, policy_choices=finals, examples=examples, runs=runs,
                    default_run=runs[0] if runs else "", max_turns=cfg.agent.max_turns,
                    temperature=cfg.agent.sampling.temperature, tools=cfg.tools.enabled)
    print(f"mmsearch app on http://{args.host}:{args.port} (policy {policy}; {len(examples)} example scenes"
          f"{' from ' + str(kb) if examples else ''}; {len(runs)} run dirs to browse). Ctrl-C stops it.", flush=True)
    serve(app, args.host, args.port, quiet=True)  # (Gradio serves the examples from copies in its cache)
    return 0


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
