"""Handlers for the data pipeline: `synth` and `synth import`."""

from __future__ import annotations

from mmsearch.cli.commands import _load


def synth_run(args) -> int:
    from data_pipeline.synth.config import SynthConfig
    from data_pipeline.synth.run import run_synth

    cfg = _load(SynthConfig, args, kb=args.kb, index=args.index, server=args.server, out=args.out, n=args.n,
                seed=args.seed, trajectories=args.trajectories, processor=args.processor,
                sharegpt=True if args.push_format == "sharegpt" else None)
    summary = run_synth(cfg)
    _print_summary(cfg.out, summary)
    return 0


def synth_import(args) -> int:
    from data_pipeline.synth.config import ImportConfig
    from data_pipeline.synth.importer import run_import

    cfg = _load(ImportConfig, args, records=args.records, image_root=args.image_root, out=args.out, seed=args.seed)
    _print_summary(cfg.out, run_import(cfg))
    return 0


def _print_summary(out: str, summary: dict) -> None:
    counts = summary.get("counts", {})
    print(f"wrote {out}: " + ", ".join(f"{split} {n}" for split, n in counts.items())
          + f"; fingerprint {summary.get('fingerprint', '?')}; card: {out}/card.md")
    dropped = summary.get("dropped") or summary.get("skipped") or {}
    if dropped:
        print("dropped: " + ", ".join(f"{reason} {n}" for reason, n in sorted(dropped.items(), key=lambda kv: -kv[1])))
