"""Handlers for `mmsearch kb import` and `mmsearch kb check`: bringing a collection in, and checking it first."""

from __future__ import annotations

import json
import logging
import sys


def kb_import(args) -> int:
    from data_pipeline.kb_import import REPORT_FILE, import_flashrag, import_images

    if args.format == "flashrag":
        if not args.corpus:
            raise ValueError("--format flashrag needs --corpus FILE.jsonl")
        entry = import_flashrag(args.corpus, args.out)
        what = "passages"
    else:
        if not (args.images and args.captions):
            raise ValueError("--format images needs --images DIR and --captions FILE (.jsonl or .csv)")
        entry = import_images(args.images, args.captions, args.out)
        what = "images"
    print(f"wrote {args.out}/{entry['file']}: {entry['written']} {what} from {entry['read']} records "
          f"in {entry['seconds']:.1f}s")
    if entry["skipped"]:
        print(f"skipped {entry['skipped_total']}: "
              + ", ".join(f"{reason} {s['count']}" for reason, s in entry["skipped"].items()))
    print(f"report: {args.out}/{REPORT_FILE}; next: mmsearch kb check {args.out}")
    return 0


def kb_check(args) -> int:
    from data_pipeline.kb_check import check_kb, format_report

    # The reader logs each file's skips as a warning; the report lists them all, so the log would say it twice.
    logging.getLogger("tools.kb").setLevel(logging.ERROR)
    report = check_kb(args.kb)
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else format_report(report))
    if not report["buildable"]:
        print(f"mmsearch: error: nothing can be built from {args.kb}: it has no usable passages and no usable "
              "images (see the skip reasons above)", file=sys.stderr)
        return 1
    return 0
