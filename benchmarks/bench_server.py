"""Tool-server throughput: the micro-batched server against the one-query-at-a-time baseline.

Starts each server in its own process on loopback over the same index dir, then drives them in
turn (never both at once) with 1, 16 and 64 concurrent clients, alternating between the servers
for several repeats of each cell so that load from elsewhere on the machine hits both alike. Each
client behaves like a rollout worker: one query per request, the next request as soon as the
answer arrives, a mix of text (hybrid) and image queries. Prints a Markdown table (queries/s,
p50/p99 latency, errors, the batched/naive throughput ratio) on stdout, progress on stderr, and
with --json saves the numbers (the batched server's queries per backend call included).

    python benchmarks/bench_server.py --index runs/index --json runs/bench_server.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 180


# ---------------------------------------------------------------------------------------------
# workload: queries drawn from the KB the index was built from


def load_workload(index_dir: Path, n_text: int, n_images: int, seed: int) -> tuple[list[str], list[str]]:
    """Text queries (passage titles plus a few words of text) and base64 PNG crops of KB images."""
    manifests = {p.parent.name: json.loads(p.read_text()) for p in index_dir.glob("*/manifest.json")}
    if not manifests:
        raise SystemExit(f"{index_dir} holds no index (no */manifest.json)")
    kb_dir = Path(next(iter(manifests.values()))["kb_dir"])
    rng = random.Random(seed)

    texts: list[str] = []
    passages_file = kb_dir / "passages.jsonl"
    if passages_file.is_file():
        with passages_file.open(encoding="utf-8") as f:
            passages = [json.loads(line) for line, _ in zip(f, range(20_000)) if line.strip()]
        for p in rng.sample(passages, min(n_text, len(passages))):
            words = p["text"].split()
            start = rng.randrange(max(1, len(words) - 6))
            texts.append(f"{p.get('title', '')} {' '.join(words[start : start + 6])}".strip())

    images: list[str] = []
    images_file = kb_dir / "images.jsonl"
    if "image" in manifests and images_file.is_file():
        with images_file.open(encoding="utf-8") as f:
            records = [json.loads(line) for line, _ in zip(f, range(20_000)) if line.strip()]
        for rec in rng.sample(records, min(n_images, len(records))):
            with Image.open(kb_dir / rec["path"]) as im:
                image = im.convert("RGB")
            # A random crop covering most of the image: what a policy's crop-then-search sends.
            w, h = image.size
            cw, ch = max(1, int(w * rng.uniform(0.6, 1.0))), max(1, int(h * rng.uniform(0.6, 1.0)))
            x, y = rng.randrange(w - cw + 1), rng.randrange(h - ch + 1)
            buf = io.BytesIO()
            image.crop((x, y, x + cw, y + ch)).save(buf, format="PNG", compress_level=1)
            images.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    if not texts:
        raise SystemExit(f"{kb_dir} gave no text queries")
    return texts, images


# ---------------------------------------------------------------------------------------------
# servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(kind: str, index_dir: Path, port: int, log_path: Path, overrides: list[str] = ()) -> subprocess.Popen:
    if kind == "batched":
        code = "import sys; from mmsearch.cli.main import main; sys.exit(main(sys.argv[1:]))"
        cmd = [sys.executable, "-c", code, "serve", "--index", str(index_dir), "--port", str(port), *overrides]
    else:
        cmd = [sys.executable, str(REPO / "benchmarks" / "naive_server.py"), "--index", str(index_dir), "--port", str(port)]
    return launch(cmd, REPO, port, log_path, f"{kind} server")


def launch(cmd: list[str], cwd: Path, port: int, log_path: Path, name: str, env: dict | None = None) -> subprocess.Popen:
    """Start a server process (output to `log_path`) and wait until its /health answers 200."""
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(proc)
    raise SystemExit(f"{name} did not come up within {START_TIMEOUT_S}s; see {log_path}")


def batcher_stats(url: str) -> dict | None:
    """The batched server's counters (None for the naive server, which has none)."""
    return httpx.get(url + "/health", timeout=10).json().get("batcher")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------------------------
# load generator


class Connection:
    """One keep-alive HTTP/1.1 connection speaking just enough of the protocol for this benchmark.

    Not httpx: on a small machine the load generator shares the CPU with the server, and httpx's
    per-request cost (several ms of Python in its pool and h11, worse with many connections) made
    the generator, not the server, the bottleneck; this costs a fraction of that. Both servers are
    driven by the same code, so the comparison is unaffected.
    """

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        try:
            self.writer.write(
                f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode() + body
            )
            head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            status = int(head[0].split()[1])
            headers = dict(line.split(":", 1) for line in head[1:] if ":" in line)
            length = int(next(v for k, v in headers.items() if k.strip().lower() == "content-length"))
            return status, await self.reader.readexactly(length)
        except Exception:
            self.close()  # a broken connection is re-opened by the next request
            raise

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def drive(url: str, clients: int, seconds: float, warmup_s: float, texts: list[str], images: list[str],
                image_fraction: float, k: int, mode: str, seed: int) -> dict:
    """`clients` loops of single-query requests for `seconds` (after `warmup_s`, not counted); raw numbers."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    run = {"latencies": [], "errors": [], "text": 0, "image": 0}
    t_measure = time.perf_counter() + warmup_s
    t_end = t_measure + seconds

    async def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        conn = Connection(host, int(port))
        while (start := time.perf_counter()) < t_end:
            if images and rng.random() < image_fraction:
                kind, path, body = "image", "/v1/image_search", {"images": [rng.choice(images)], "k": k}
            else:
                kind, path, body = "text", "/v1/text_search", {"queries": [rng.choice(texts)], "k": k, "mode": mode}
            try:
                status, payload = await conn.post(path, json.dumps(body).encode())
                ok = status == 200 and len(json.loads(payload)["results"]) == 1
                problem = None if ok else f"HTTP {status}: {payload[:200]!r}"
            except (OSError, asyncio.IncompleteReadError, ValueError, KeyError, StopIteration) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if start < t_measure:  # warm-up requests are not counted
                continue
            if problem:
                run["errors"].append(problem)
            else:
                run["latencies"].append(time.perf_counter() - start)
                run[kind] += 1
        conn.close()

    await asyncio.gather(*(client(i) for i in range(clients)))
    run["seconds"] = time.perf_counter() - t_measure  # includes the last in-flight requests
    return run


def summarize(clients: int, runs: list[dict]) -> dict:
    """Pool the repeats of one cell: queries/s over their total time, latency percentiles over all requests."""
    latencies = [x for run in runs for x in run["latencies"]]
    errors = [e for run in runs for e in run["errors"]]
    seconds = sum(run["seconds"] for run in runs)
    lat_ms = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {
        "clients": clients,
        "seconds": round(seconds, 2),
        "queries": len(latencies),
        "text_queries": sum(run["text"] for run in runs),
        "image_queries": sum(run["image"] for run in runs),
        "qps": round(len(latencies) / seconds, 1),
        "qps_per_repeat": [round(len(run["latencies"]) / run["seconds"], 1) for run in runs],
        "p50_ms": round(float(np.percentile(lat_ms, 50)), 1),
        "p99_ms": round(float(np.percentile(lat_ms, 99)), 1),
        "errors": len(errors),
        "first_errors": errors[:3],
    }


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description="Batched vs naive tool-server throughput.")
    parser.add_argument("--index", required=True, help="index dir (served by both servers)")
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated client counts")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per cell and repeat")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each measurement")
    parser.add_argument("--repeats", type=int, default=3,
                        help="measurements per cell, alternating the servers, so load from elsewhere on "
                             "the machine hits both alike")
    parser.add_argument("--image-fraction", type=float, default=0.25, help="share of image queries")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--mode", default="hybrid", choices=["bm25", "dense", "hybrid"])
    parser.add_argument("--servers", default="naive,batched")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--serve-overrides", nargs="*", default=[], metavar="key=value",
                        help="ServeConfig overrides for the batched server, e.g. max_wait_ms=5")
    parser.add_argument("--json", help="write the numbers here")
    parser.add_argument("--logs", default="", help="dir for server logs (default: a temp dir)")
    args = parser.parse_args()

    index_dir = Path(args.index).resolve()
    levels = [int(c) for c in args.concurrency.split(",")]
    kinds = args.servers.split(",")
    texts, images = load_workload(index_dir, n_text=512, n_images=64, seed=args.seed)
    log_dir = Path(args.logs) if args.logs else Path(os.environ.get("TMPDIR", "/tmp")) / "bench_server_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"index {index_dir}: {len(texts)} text queries, {len(images)} image queries in the pool; "
          f"{os.cpu_count()} CPUs; {args.repeats} x {args.seconds:g}s per cell", file=sys.stderr)

    # Both servers stay up (an idle one costs memory, not CPU) so their measurements can alternate.
    procs: dict[str, subprocess.Popen] = {}
    urls: dict[str, str] = {}
    results: dict[str, list[dict]] = {kind: [] for kind in kinds}
    try:
        for kind in kinds:
            port = free_port()
            procs[kind] = start_server(kind, index_dir, port, log_dir / f"{kind}.log", args.serve_overrides)
            urls[kind] = f"http://127.0.0.1:{port}"
        for clients in levels:
            runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
            before = {kind: batcher_stats(urls[kind]) for kind in kinds}
            for repeat in range(args.repeats):
                for kind in kinds if repeat % 2 == 0 else kinds[::-1]:
                    runs[kind].append(asyncio.run(drive(
                        urls[kind], clients, args.seconds, args.warmup, texts, images,
                        args.image_fraction, args.k, args.mode, args.seed + repeat,
                    )))
            for kind in kinds:
                row = summarize(clients, runs[kind])
                if before[kind] is not None:  # the batched server: how much it fused in this cell
                    after = batcher_stats(urls[kind])
                    calls = after["backend_calls"] - before[kind]["backend_calls"]
                    row["backend_calls"] = calls
                    row["queries_per_backend_call"] = round((after["queries"] - before[kind]["queries"]) / max(1, calls), 2)
                results[kind].append(row)
                fused = f"  {row['queries_per_backend_call']} queries/backend call" if "backend_calls" in row else ""
                print(f"{kind:8s} {clients:3d} clients: {row['qps']:8.1f} q/s {row['qps_per_repeat']}  "
                      f"p50 {row['p50_ms']:.1f} ms  p99 {row['p99_ms']:.1f} ms  errors {row['errors']}{fused}",
                      file=sys.stderr)
    finally:
        for proc in procs.values():
            stop_server(proc)

    print(markdown_table(results, levels))
    if args.json:
        report = {
            "index": str(index_dir), "cpus": os.cpu_count(), "python": platform.python_version(),
            "seconds_per_measurement": args.seconds, "repeats": args.repeats, "image_fraction": args.image_fraction,
            "k": args.k, "mode": args.mode, "results": results,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def markdown_table(results: dict[str, list[dict]], levels: list[int]) -> str:
    naive = {r["clients"]: r for r in results.get("naive", [])}
    batched = {r["clients"]: r for r in results.get("batched", [])}
    lines = [
        "| clients | naive q/s | batched q/s | batched/naive | naive p50 / p99 ms | batched p50 / p99 ms | errors (naive / batched) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in levels:
        n, b = naive.get(c), batched.get(c)
        ratio = f"{b['qps'] / n['qps']:.2f}x" if n and b and n["qps"] else "-"
        cells = [
            str(c), _cell(n, "qps"), _cell(b, "qps"), ratio,
            f"{_cell(n, 'p50_ms')} / {_cell(n, 'p99_ms')}", f"{_cell(b, 'p50_ms')} / {_cell(b, 'p99_ms')}",
            f"{_cell(n, 'errors')} / {_cell(b, 'errors')}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(row: dict | None, key: str) -> str:
    return "-" if row is None else str(row[key])


if __name__ == "__main__":
    main()
