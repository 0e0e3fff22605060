"""`make bench`: build the benchmark-scale world and its indexes (once), then run every benchmark.

    python benchmarks/run_all.py --out bench_out [--small]

Steps whose output already exists are skipped, so a rerun only re-measures. `--small` uses the
default 300-entity world instead of the 100k-passage / 20k-image one (a quick smoke run).
Each benchmark's table is printed and collected into `<out>/results.md`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str], capture: bool = False) -> str:
    print("$", " ".join(cmd), flush=True)
    result = subprocess.run(cmd, cwd=ROOT, check=True, text=True, stdout=subprocess.PIPE if capture else None)
    return result.stdout if capture else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--small", action="store_true", help="use the default world (smoke run)")
    args = parser.parse_args()

    out = Path(args.out).resolve()
    world, clip, index = out / "world", out / "clip", out / "index"
    mmsearch = [sys.executable, "-m", "mmsearch.cli.main"]
    world_cfg = "configs/world/default.yaml" if args.small else "configs/world/bench.yaml"
    if not (world / "world.json").exists():
        run(mmsearch + ["world", "build", "--config", world_cfg, "--out", str(world)])
    if not (clip / "report.json").exists():
        run(mmsearch + ["clip", "train", "--config", "configs/clip/tiny.yaml", "--kb", str(world), "--out", str(clip)])
    if not (index / "image" / "manifest.json").exists():
        run(mmsearch + ["index", "build", "--kb", str(world), "--out", str(index), f"image_encoder.name={clip}"])

    policy = out / "policy"
    if not (policy / "config.json").exists():
        run(mmsearch + ["model", "init-tiny", "--config", "configs/model/tiny.yaml", "--kb", str(world), "--out", str(policy)])
    sft_data = out / "sft_dataset"  # gold trajectories for the SFT benchmark (crop boxes in the policy's pixels)
    if not (sft_data / "dataset_dict.json").exists():
        run(mmsearch + ["synth", "--kb", str(world), "--index", str(index), "--out", str(sft_data), "--n", "300",
                        "--processor", str(policy)])

    sections = [
        ("In-process search", [sys.executable, "benchmarks/bench_search.py", "--index", str(index),
                               "--json", str(out / "search.json")]),
        ("Tool server vs one-at-a-time server", [sys.executable, "benchmarks/bench_server.py", "--index", str(index),
                                                 "--json", str(out / "server.json")]),
        ("Agent rollouts: batched loop vs one at a time", [sys.executable, "benchmarks/bench_rollout.py", "--kb", str(world),
                                                           "--index", str(index), "--policy", str(policy),
                                                           "--json", str(out / "rollout.json")]),
        ("Dataset synthesis", [sys.executable, "benchmarks/bench_synth.py", "--kb", str(world), "--index", str(index),
                               "--policy", str(policy), "--json", str(out / "synth.json")]),
        ("Cold-start SFT", [sys.executable, "benchmarks/bench_sft.py", "--model", str(policy), "--data", str(sft_data),
                            "--out", str(out / "sft.json")]),
    ]
    report = []
    for title, cmd in sections:
        table = run(cmd, capture=True)
        print(table)
        report.append(f"## {title}\n\n`{' '.join(Path(c).name if c == sys.executable else c for c in cmd)}`\n\n{table}")
    (out / "results.md").write_text("\n".join(report))
    print(f"wrote {out / 'results.md'}")


if __name__ == "__main__":
    main()
