#!/usr/bin/env python3
"""Throughput of ``cbir serve`` (waitress, the real model) for one client against
``--clients`` concurrent ones, each uploading real photos in a loop, then the
worst uploads on top (bench/serve_uploads.py's PNG bomb) to show the memory bound
still holds while the clients search.

    python -m bench.serve_concurrency                     # mobilenet_v2 over ../shared/datasets/ukbench_mini
    python -m bench.serve_concurrency --model test_tiny   # no real weights needed

Phases of ``--seconds`` each, alternated ``--rounds`` times (1 client, N clients,
1, N, ...) so that a change in the machine's load hits both alike; the server and
the request are the same in every phase. The clients are threads of this one
process, each on one persistent (keep-alive) HTTP connection with its multipart
bodies built once, so that the load generator takes little of the CPU it
measures (its CPU per request is printed). Printed per phase: answered requests
per second, p50 / p99 latency, the server's and the clients' CPU milliseconds per
request; then the ratio of the best N-client throughput to the best 1-client one
(the goal, issue 22: >= 1.6 on 2 cores), the load average, and the server's peak
RSS (VmHWM) after the bombs. The result file goes to bench/results/
(bench/harness.py).
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py`: see bench/harness.py
from bench.harness import load_average, write_result
from bench.serve_uploads import BOUNDARY, bomb_png, multipart_body, post, server_arguments, serving, status_of


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    server_arguments(p)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=15.0, help="length of each phase")
    p.add_argument("--rounds", type=int, default=2, help="1-client / N-client phase pairs")
    p.add_argument("--bombs", type=int, default=8, help="worst-case uploads sent during the last phase")
    p.add_argument("--out", type=Path, help="the result file (default: bench/results/serve_concurrency-<time>.json)")
    return p.parse_args()


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of process ``pid`` (default: this one), all its threads."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def phase(url: str, bodies: list[bytes], clients: int, seconds: float, server_pid: int | None = None) -> dict:
    """``clients`` threads, each on one keep-alive connection, uploading ``bodies``
    round-robin for ``seconds``: answered per second, latencies, CPU per request."""
    latencies: list[float] = []
    failures: list[str] = []
    address = urlsplit(url)
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    deadline = time.perf_counter() + seconds

    def client(offset: int) -> None:
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=600)
        n = offset
        try:
            while time.perf_counter() < deadline:
                body = bodies[n % len(bodies)]
                n += clients
                started = time.perf_counter()
                connection.request("POST", "/api/search", body, headers)
                response = connection.getresponse()
                answer = response.read()
                if response.status == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    failures.append(f"{response.status} {answer[:80]!r}")
        except OSError as exc:
            failures.append(str(exc)[:80])
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    server_cpu, client_cpu = (cpu_seconds(server_pid) if server_pid else 0.0), cpu_seconds()
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if failures:
        raise SystemExit(f"{len(failures)} requests failed, e.g. {failures[0]}")
    answered = max(1, len(latencies))
    ordered = sorted(latencies)
    return {"clients": clients, "req_per_s": len(latencies) / elapsed, "answered": len(latencies),
            "p50_ms": 1000 * statistics.median(ordered), "p99_ms": 1000 * ordered[int(0.99 * (len(ordered) - 1))],
            "server_cpu_ms_per_req": 1000 * (cpu_seconds(server_pid) - server_cpu) / answered if server_pid else None,
            "client_cpu_ms_per_req": 1000 * (cpu_seconds() - client_cpu) / answered,
            "load": os.getloadavg()[0]}


def describe(result: dict) -> str:
    server = result["server_cpu_ms_per_req"]
    return (f"{result['clients']} client(s): {result['req_per_s']:5.1f} req/s, p50 {result['p50_ms']:4.0f} ms, "
            f"p99 {result['p99_ms']:4.0f} ms ({result['answered']} answered); CPU per request: server "
            + (f"{server:4.1f} ms" if server is not None else "?")
            + f", clients {result['client_cpu_ms_per_req']:3.1f} ms; load {result['load']:.1f}")


def main() -> None:
    args = parse_args()
    photos = [(p.name, p.read_bytes()) for p in sorted(args.images.rglob("*.jpg"))]
    bodies = [multipart_body(data, name) for name, data in photos]
    with serving(args.images, args.model) as (server, url):
        phase(url, bodies, 2, 2.0)  # warm-up
        load_before = load_average()
        phases: list[dict] = []
        for _ in range(args.rounds):
            for clients in (1, args.clients):
                phases.append(phase(url, bodies, clients, args.seconds, server.pid))
                print(describe(phases[-1]), flush=True)
        before_bombs = status_of(server.pid)["VmHWM"]
        bomb = bomb_png(args.side)
        outcomes: list[tuple[int, str]] = []
        bombers = [threading.Thread(target=lambda: outcomes.append(post(url, bomb, "bomb.png")))
                   for _ in range(args.bombs)]
        for t in bombers:
            t.start()
        with_bombs = phase(url, bodies, args.clients, args.seconds, server.pid)
        for t in bombers:
            t.join()
        peak = status_of(server.pid)["VmHWM"]
        load_after = load_average()
    answers: dict[str, int] = {}
    for status, message in outcomes:
        answers[f"{status} {message}"] = answers.get(f"{status} {message}", 0) + 1
    best = {n: max(p["req_per_s"] for p in phases if p["clients"] == n) for n in (1, args.clients)}
    ratio = best[args.clients] / best[1]
    cores = len(os.sched_getaffinity(0))
    print(f"with {args.bombs} x {args.side}x{args.side} PNG bombs: " + describe(with_bombs))
    print(f"{args.clients} clients / 1 client (best phases): {ratio:.2f}x on {cores} cores, model {args.model}, "
          f"{len(photos)} photos; load average {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print(f"server peak RSS {before_bombs} MB before the bombs, {peak} MB after (VmHWM); bombs: {answers}")
    path = write_result("serve_concurrency", {
        "phases": phases, "with_bombs": with_bombs, "ratio_best": ratio, "best_req_per_s": best,
        "peak_rss_mb_before_bombs": before_bombs, "peak_rss_mb_after_bombs": peak, "bombs": answers,
        "load_before": load_before, "load_after": load_after,
    }, out=args.out, extra={"settings": {
        "model": args.model, "images": str(args.images), "photos": len(photos), "cores": cores,
        "clients": args.clients, "seconds": args.seconds, "rounds": args.rounds, "bombs": args.bombs,
        "side": args.side, "client": "threads of one process, one keep-alive connection each"}})
    print(f"result: {path}")


if __name__ == "__main__":
    main()
