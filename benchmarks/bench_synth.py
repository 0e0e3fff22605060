"""Synthesis throughput: examples per second, without trajectories and with gold trajectories.

    python benchmarks/bench_synth.py --kb WORLD --index INDEX [--policy POLICY] [--n 2000] [--json out.json]

Three runs of `mmsearch synth` on the same KB, seed and mix, each into a fresh dir:
- questions only (`trajectories=none`): graph walks, wording, scene composition, filters, export;
- gold trajectories with the tools in-process (the planner's crops and searches run for real);
- gold trajectories through the tool server (`mmsearch serve` in its own process, on loopback).
Start-up (imports, loading the index) is timed separately. Generation (candidates to the streamed
work file) and export (DatasetDict with embedded images, Parquet, card) are reported apart.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from data_pipeline.synth.config import SynthConfig
from data_pipeline.synth.run import Synthesizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(cfg: SynthConfig) -> dict:
    start = time.perf_counter()
    synth = Synthesizer(cfg, progress=False)
    if cfg.trajectories != "none":
        synth.toolbox  # noqa: B018 - open the index (or connect) before the clock starts
    ready = time.perf_counter()
    summary = synth.run()
    wall = time.perf_counter() - ready
    kept = sum(summary["counts"].values())
    timings = summary["timings"]
    return {"examples": kept, "startup_s": ready - start, "wall_s": wall, "examples_per_s": kept / wall,
            "generate_per_s": kept / timings["generate_s"], "export_s": timings["export_s"],
            "dropped": sum(summary["dropped"].values())}


def serve(index: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mmsearch.cli.main", "serve", "--index", index, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the tool server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kb", required=True)
    parser.add_argument("--index", required=True)
    parser.add_argument("--policy", default="", help="policy dir: crop boxes in its pixels (as make demo does)")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_synth_"))
    common = {"kb": args.kb, "index": args.index, "n": args.n, "seed": 0, "processor": args.policy}
    results = {"questions only": measure(SynthConfig(out=str(work / "none"), trajectories="none", **common)),
               "gold, tools in-process": measure(SynthConfig(out=str(work / "gold"), **common))}
    proc, url = serve(args.index)
    try:
        results["gold, tool server"] = measure(SynthConfig(out=str(work / "served"), server=[url], **common))
    finally:
        proc.terminate()
        proc.wait()
    shutil.rmtree(work)

    print(f"| mode ({args.n} requested) | examples kept | examples/s, end to end | examples/s, generation | "
          "export s | wall s | start-up s | candidates dropped |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode, r in results.items():
        print(f"| {mode} | {r['examples']} | **{r['examples_per_s']:.0f}** | {r['generate_per_s']:.0f} | "
              f"{r['export_s']:.1f} | {r['wall_s']:.1f} | {r['startup_s']:.1f} | {r['dropped']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
