#!/usr/bin/env python3
"""Throughput of ``cbir serve`` (waitress, the real model) for one client against
``--clients`` concurrent ones, each uploading real photos in a loop, then the
worst uploads on top (bench/serve_uploads.py's PNG bomb) to show the memory bound
still holds while the clients search.

    python -m bench.serve_concurrency                     # mobilenet_v2 over ../shared/datasets/ukbench_mini
    python -m bench.serve_concurrency --model test_tiny   # no real weights needed

Phases of ``--seconds`` each, alternated ``--rounds`` times (1 client, N clients,
1, N, ...) so that a change in the machine's load hits both alike; printed per
phase: answered requests per second, p50 / p99 latency; then the ratio of the
best N-client throughput to the best 1-client one (the goal, issue 22: >= 1.6 on
2 cores), the load average, and the server's peak RSS (VmHWM) after the bombs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py`: see bench/harness.py
from bench.serve_uploads import bomb_png, post, serving, status_of  # the sibling bench's helpers

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=Path, default=REPO.parent / "shared" / "datasets" / "ukbench_mini")
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=15.0, help="length of each phase")
    p.add_argument("--rounds", type=int, default=2, help="1-client / N-client phase pairs")
    p.add_argument("--bombs", type=int, default=8, help="worst-case uploads sent during the last phase")
    p.add_argument("--side", type=int, default=9400, help="the bomb PNG's width and height")
    return p.parse_args()


def phase(url: str, photos: list[tuple[str, bytes]], clients: int, seconds: float) -> tuple[float, list[float]]:
    """``clients`` threads uploading ``photos`` round-robin for ``seconds``: (answered
    per second, latencies of the answered requests)."""
    latencies: list[float] = []
    failures: list[str] = []
    deadline = time.perf_counter() + seconds

    def client(offset: int) -> None:
        n = offset
        while time.perf_counter() < deadline:
            name, data = photos[n % len(photos)]
            n += clients
            started = time.perf_counter()
            status, message = post(url, data, name)
            if status == 200:
                latencies.append(time.perf_counter() - started)
            else:
                failures.append(f"{status} {message}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise SystemExit(f"{len(failures)} requests failed, e.g. {failures[0]}")
    return len(latencies) / (time.perf_counter() - started), latencies


def describe(clients: int, rate: float, latencies: list[float]) -> str:
    ordered = sorted(latencies)
    p99 = ordered[int(0.99 * (len(ordered) - 1))]
    return (f"{clients} client(s): {rate:5.1f} req/s, p50 {1000 * statistics.median(ordered):4.0f} ms, "
            f"p99 {1000 * p99:4.0f} ms ({len(ordered)} answered)")


def main() -> None:
    args = parse_args()
    photos = [(p.name, p.read_bytes()) for p in sorted(args.images.rglob("*.jpg"))]
    with serving(args.images, args.model) as (server, url):
        phase(url, photos, 2, 2.0)  # warm-up
        load_before = os.getloadavg()[0]
        best: dict[int, float] = {}
        for _ in range(args.rounds):
            for clients in (1, args.clients):
                rate, latencies = phase(url, photos, clients, args.seconds)
                best[clients] = max(best.get(clients, 0.0), rate)
                print(describe(clients, rate, latencies), flush=True)
        before_bombs = status_of(server.pid)["VmHWM"]
        bomb = bomb_png(args.side)
        outcomes: list[tuple[int, str]] = []
        bombers = [threading.Thread(target=lambda: outcomes.append(post(url, bomb, "bomb.png")))
                   for _ in range(args.bombs)]
        for t in bombers:
            t.start()
        rate, latencies = phase(url, photos, args.clients, args.seconds)
        for t in bombers:
            t.join()
        peak = status_of(server.pid)["VmHWM"]
        load_after = os.getloadavg()[0]
    answers: dict[str, int] = {}
    for status, message in outcomes:
        answers[f"{status} {message}"] = answers.get(f"{status} {message}", 0) + 1
    print(f"with {args.bombs} x {args.side}x{args.side} PNG bombs: " + describe(args.clients, rate, latencies))
    print(f"{args.clients} clients / 1 client (best phases): {best[args.clients] / best[1]:.2f}x on "
          f"{len(os.sched_getaffinity(0))} cores, model {args.model}, {len(photos)} photos; "
          f"load average {load_before:.1f} -> {load_after:.1f}")
    print(f"server peak RSS {before_bombs} MB before the bombs, {peak} MB after (VmHWM); bombs: {answers}")


if __name__ == "__main__":
    main()
