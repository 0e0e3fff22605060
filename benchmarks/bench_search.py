"""In-process search latency and index build cost on one index dir.

    python benchmarks/bench_search.py --index runs/bench/index [--queries 300] [--json out.json]

Prints a Markdown table: per index its record count, build seconds and size on disk, then p50/p99
latency of single-query text search (bm25, dense, hybrid) and image search, as a rollout worker
calls them (one query at a time, in-process, after a warm-up).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from PIL import Image

from tools.search.local import LocalSearch


def dir_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def time_calls(fn, inputs: list) -> dict:
    for item in inputs[:10]:  # warm-up: first calls touch cold pages and allocate buffers
        fn(item)
    ms = []
    for item in inputs:
        start = time.perf_counter()
        fn(item)
        ms.append((time.perf_counter() - start) * 1000)
    return {"n": len(ms), "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "mean_ms": statistics.fmean(ms)}


def sample_queries(kb_dir: Path, n: int, rng: random.Random) -> list[str]:
    """Entity names plus relation words, the shape of queries an agent writes."""
    entities = [json.loads(line) for line in (kb_dir / "entities.jsonl").open()]
    queries = []
    for entity in rng.sample(entities, min(n, len(entities))):
        relation = rng.choice(list(entity.get("relations") or {"": None}))
        queries.append(f"{entity['name']} {relation.replace('_', ' ')}".strip())
    return queries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", required=True)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    search = LocalSearch(args.index, device="cpu")
    index_dir = Path(args.index)
    build = {
        kind: {"count": m.count, "build_s": m.build_seconds, "size_mb": round(dir_size_mb(index_dir / kind), 1),
               "encoder": m.encoder.split("/")[-1], "faiss": m.faiss_factory or "-"}
        for kind, m in search.manifests.items()
    }
    kb_dir = Path(next(iter(search.manifests.values())).kb_dir)
    queries = sample_queries(kb_dir, args.queries, rng)
    latency = {mode: time_calls(lambda q, m=mode: search.text_search([q], 5, m), queries) for mode in search.text_modes}
    if "image" in search.manifests:
        records = [json.loads(line) for line in (kb_dir / "images.jsonl").open()]
        images = [Image.open(kb_dir / r["path"]).convert("RGB") for r in rng.sample(records, min(args.queries, len(records)))]
        latency["image"] = time_calls(lambda img: search.image_search([img], 5), images)

    print("| index | records | encoder | FAISS | build (s) | size (MB) |\n|---|---:|---|---|---:|---:|")
    for kind, b in build.items():
        print(f"| {kind} | {b['count']:,} | {b['encoder']} | {b['faiss']} | {b['build_s']:.1f} | {b['size_mb']} |")
    print("\n| search (in-process, 1 query) | n | p50 (ms) | p99 (ms) |\n|---|---:|---:|---:|")
    for name, lat in latency.items():
        print(f"| {name} | {lat['n']} | {lat['p50_ms']:.2f} | {lat['p99_ms']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"build": build, "latency": latency}, indent=2))


if __name__ == "__main__":
    main()
