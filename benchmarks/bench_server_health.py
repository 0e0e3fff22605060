"""/health latency of a busy tool server: what a load balancer or `SearchClient` sees while it searches.

Starts the tool server (`mmsearch serve`) in its own process on loopback, drives it with N
concurrent search clients (bench_server.py's load generator: one query per request, the next as
soon as the answer arrives, 75% hybrid text / 25% image), and meanwhile probes `GET /health` from
a separate process, one probe every `--probe-interval-ms`, as a load balancer's health check does.
A probe's latency is counted from when it was due, not from when the previous one let it go: a
server that stalls for 300 ms delays every probe due in those 300 ms, and each counts (counting
from the send would record one slow probe and hide the rest). The probe runs in its own process so
that the load generator's event loop does not delay it.

Side by side: `--code NAME=DIR` (repeatable) serves from the checkout in DIR, e.g. the commit
before a change (`git worktree add --detach /tmp/old <commit>`); the checkouts are measured in
turn, alternating on every repeat so that load from elsewhere on the machine hits them alike.
Prints a Markdown table on stdout, progress on stderr; --json saves the numbers.

    python benchmarks/bench_server_health.py --index bench_out/index --code before=/tmp/old --code after=.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import drive, free_port, launch, load_workload, stop_server

REPO = Path(__file__).resolve().parent.parent
PROBE_TIMEOUT_S = 10.0


# ---------------------------------------------------------------------------------------------
# the server, from a given checkout


def start_server(code_dir: Path, index_dir: Path, port: int, log_path: Path, overrides: list[str]) -> subprocess.Popen:
    """`mmsearch serve` with the packages of `code_dir` first on the path (the venv's install is editable)."""
    run = "import sys; from mmsearch.cli.main import main; sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", run, "serve", "--index", str(index_dir), "--port", str(port), *overrides]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(code_dir), os.environ.get("PYTHONPATH")]))}
    return launch(cmd, code_dir, port, log_path, f"server from {code_dir}", env)


# ---------------------------------------------------------------------------------------------
# the /health probe (in its own process)


def probe_health(port: int, warmup_s: float, seconds: float, interval_s: float, fresh: bool, out) -> None:
    """GET /health every interval_s for `seconds` after `warmup_s`; sends ([latency_s], [error]) to `out`.

    Each latency runs from the probe's due time (see the module doc)."""
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    latencies: list[float] = []
    errors: list[str] = []
    sock: socket.socket | None = None
    time.sleep(warmup_s)
    due = time.perf_counter()
    t_end = due + seconds
    while due < t_end and time.perf_counter() < t_end + PROBE_TIMEOUT_S:  # a dead server ends it too
        try:
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", port), timeout=PROBE_TIMEOUT_S)
            sock.sendall(request)
            status = _read_response(sock)
            if status == 200:
                latencies.append(time.perf_counter() - due)
            else:
                errors.append(f"HTTP {status}")
        except OSError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            sock = _close(sock)
        if fresh:
            sock = _close(sock)
        due += interval_s
        time.sleep(max(0.0, due - time.perf_counter()))
    if due < t_end:
        errors.append(f"{int((t_end - due) / interval_s)} probes never sent: the server was stalled at the end")
    _close(sock)
    out.send((latencies, errors))
    out.close()


def _read_response(sock: socket.socket) -> int:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
    length = int(headers.get("content-length", 0))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection mid-body")
        body += chunk
    return int(lines[0].split()[1])


def _close(sock: socket.socket | None) -> None:
    if sock is not None:
        sock.close()


# ---------------------------------------------------------------------------------------------


def measure(url: str, clients: int, args, texts: list[str], images: list[str], seed: int) -> dict:
    """One measurement: `clients` search loops and the /health probe, side by side, for args.seconds."""
    port = int(url.rsplit(":", 1)[1])
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    prober = ctx.Process(target=probe_health,
                         args=(port, args.warmup, args.seconds, args.probe_interval_ms / 1000, args.fresh, send))
    prober.start()
    if clients:
        load = asyncio.run(drive(url, clients, args.seconds, args.warmup, texts, images,
                                 args.image_fraction, args.k, args.mode, seed))
    else:
        time.sleep(args.warmup + args.seconds)
        load = {"latencies": [], "errors": [], "seconds": args.seconds}
    # The probe ends within one probe timeout of the load.
    if not receive.poll(args.warmup + args.seconds + PROBE_TIMEOUT_S + 30):
        prober.kill()
        raise SystemExit("the /health probe did not report")
    probe_latencies, probe_errors = receive.recv()
    prober.join(timeout=10)
    return {"load": load, "probe": probe_latencies, "probe_errors": probe_errors}


def summarize(name: str, clients: int, runs: list[dict]) -> dict:
    search = [x for run in runs for x in run["load"]["latencies"]]
    search_errors = [e for run in runs for e in run["load"]["errors"]]
    seconds = sum(run["load"]["seconds"] for run in runs)
    probes = np.array([x for run in runs for x in run["probe"]]) * 1000
    probe_errors = [e for run in runs for e in run["probe_errors"]]

    def pct(values: np.ndarray, q: float) -> float | None:
        return round(float(np.percentile(values, q)), 1) if len(values) else None

    search_ms = np.array(search) * 1000
    return {
        "code": name, "clients": clients, "seconds": round(seconds, 2),
        "search_qps": round(len(search) / seconds, 1) if seconds else 0.0,
        "search_p50_ms": pct(search_ms, 50), "search_p99_ms": pct(search_ms, 99),
        "search_errors": len(search_errors), "first_search_errors": search_errors[:3],
        "health_probes": len(probes),
        "health_p50_ms": pct(probes, 50), "health_p99_ms": pct(probes, 99),
        "health_max_ms": round(float(probes.max()), 1) if len(probes) else None,
        "health_errors": len(probe_errors), "first_health_errors": probe_errors[:3],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="/health latency of a busy tool server.")
    parser.add_argument("--index", required=True, help="index dir")
    parser.add_argument("--code", action="append", metavar="NAME=DIR",
                        help="serve from the checkout in DIR (repeatable; default: this checkout, as 'current')")
    parser.add_argument("--clients", default="64", help="comma-separated search-client counts (0: idle server)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per cell and repeat")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each measurement")
    parser.add_argument("--repeats", type=int, default=1, help="measurements per cell, alternating the checkouts")
    parser.add_argument("--probe-interval-ms", type=float, default=20.0, help="one /health probe per interval")
    parser.add_argument("--fresh", action="store_true",
                        help="a new connection per probe (as a load balancer's health check), not keep-alive")
    parser.add_argument("--image-fraction", type=float, default=0.25, help="share of image queries")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--mode", default="hybrid", choices=["bm25", "dense", "hybrid"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--serve-overrides", nargs="*", default=[], metavar="key=value",
                        help="ServeConfig overrides for every server, e.g. max_wait_ms=5")
    parser.add_argument("--json", help="write the numbers here")
    parser.add_argument("--logs", default="", help="dir for server logs (default: a temp dir)")
    args = parser.parse_args()

    index_dir = Path(args.index).resolve()
    codes = dict(spec.split("=", 1) for spec in (args.code or [f"current={REPO}"]))
    codes = {name: Path(d).resolve() for name, d in codes.items()}
    levels = [int(c) for c in args.clients.split(",")]
    texts, images = load_workload(index_dir, n_text=512, n_images=64, seed=args.seed)
    log_dir = Path(args.logs) if args.logs else Path(os.environ.get("TMPDIR", "/tmp")) / "bench_server_health_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"index {index_dir}; {os.cpu_count()} CPUs; {args.repeats} x {args.seconds:g}s per cell; "
          f"a /health probe every {args.probe_interval_ms:g} ms ({'fresh' if args.fresh else 'keep-alive'} connection)",
          file=sys.stderr)

    procs: dict[str, subprocess.Popen] = {}
    urls: dict[str, str] = {}
    results: list[dict] = []
    try:
        for name, code_dir in codes.items():
            port = free_port()
            procs[name] = start_server(code_dir, index_dir, port, log_dir / f"{name}.log", args.serve_overrides)
            urls[name] = f"http://127.0.0.1:{port}"
        names = list(codes)
        for clients in levels:
            runs: dict[str, list[dict]] = {name: [] for name in names}
            for repeat in range(args.repeats):
                for name in names if repeat % 2 == 0 else names[::-1]:
                    runs[name].append(measure(urls[name], clients, args, texts, images, args.seed + repeat))
            for name in names:
                row = summarize(name, clients, runs[name])
                results.append(row)
                print(f"{name:10s} {clients:3d} clients: /health p50 {row['health_p50_ms']} ms  p99 "
                      f"{row['health_p99_ms']} ms  max {row['health_max_ms']} ms ({row['health_probes']} probes, "
                      f"{row['health_errors']} errors)  search {row['search_qps']} q/s  errors {row['search_errors']}",
                      file=sys.stderr)
    finally:
        for proc in procs.values():
            stop_server(proc)

    print(markdown_table(results))
    if args.json:
        report = {"index": str(index_dir), "cpus": os.cpu_count(), "codes": {k: str(v) for k, v in codes.items()},
                  "seconds_per_measurement": args.seconds, "repeats": args.repeats,
                  "probe_interval_ms": args.probe_interval_ms, "fresh_connections": args.fresh,
                  "image_fraction": args.image_fraction, "k": args.k, "mode": args.mode, "results": results}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def markdown_table(results: list[dict]) -> str:
    lines = [
        ("| code | clients | /health p50 ms | /health p99 ms | /health max ms | probes (errors) "
         "| search q/s | search p50 / p99 ms | search errors |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        c = {key: "-" if value is None else value for key, value in r.items()}
        lines.append(
            f"| {c['code']} | {c['clients']} | {c['health_p50_ms']} | **{c['health_p99_ms']}** | {c['health_max_ms']} "
            f"| {c['health_probes']} ({c['health_errors']}) | {c['search_qps']} "
            f"| {c['search_p50_ms']} / {c['search_p99_ms']} | {c['search_errors']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
