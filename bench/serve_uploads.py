#!/usr/bin/env python3
"""Memory under the worst uploads: ``cbir serve`` (waitress, the real model) gets
``--uploads`` concurrent uploads of a small file that decodes to a huge raster,
while a probe asks ``/api/health`` and an id search every 100 ms.

    python bench/serve_uploads.py                       # 8 x 9400x9400 16-bit PNG, mobilenet_v2
    python bench/serve_uploads.py --model test_tiny     # no real weights needed

The index is ``--images`` (default ../shared/datasets/ukbench_mini) indexed into a
temporary folder. Printed: the upload file's size and decoded raster, the
server's RSS before the attack and its peak (VmHWM) after, how many uploads were
answered and with what, and the probe's answered / sent and p50/p95 latency.
The goal (issue 10): 8 concurrent worst-case uploads keep the server under 1.5 GB
RSS and every other request answered.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py`: see bench/harness.py
from bench.harness import SHARED, write_result


def server_arguments(p: argparse.ArgumentParser) -> None:
    """What the serve benches share: the folder indexed and served, its model, and
    the side of the worst-case PNG upload (bench.serve_concurrency uses them too)."""
    p.add_argument("--images", type=Path, default=SHARED / "ukbench_mini")
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--side", type=int, default=9400, help="the bomb PNG's width and height")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    server_arguments(p)
    p.add_argument("--uploads", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="waves of concurrent uploads")
    return p.parse_args()


def bomb_png(side: int) -> bytes:
    """A side x side 16-bit grey PNG that compresses to a few hundred KB."""
    import numpy as np
    from PIL import Image

    pixels = np.zeros((side, side), dtype=np.uint16)
    pixels[:, side // 2:] = 50_000
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def status_of(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) // 1024
    return fields


BOUNDARY = "cbirbench"


def multipart_body(data: bytes, name: str) -> bytes:
    """The search form with ``data`` as its ``image`` file."""
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def post(url: str, data: bytes, name: str) -> tuple[int, str]:
    request = urllib.request.Request(url + "api/search", data=multipart_body(data, name),
                                     headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status, "ok"
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()).get("error", "")[:80]
    except OSError as exc:
        return 0, str(exc)[:80]


@contextmanager
def serving(images: Path, model: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """``cbir serve`` (a subprocess) over ``images`` indexed with ``model`` into a
    temporary folder: (the server's process, its URL); stopped on exit."""
    with tempfile.TemporaryDirectory() as tmp_name:
        index_dir = Path(tmp_name) / "index"
        subprocess.run([sys.executable, "-m", "cbir_cli.cli", "index", str(images), "--index", str(index_dir),
                        "--model", model, "--workers", "0", "--json"], check=True, stdout=subprocess.DEVNULL)
        server = subprocess.Popen([sys.executable, "-m", "cbir_cli.cli", "serve", "--index", str(index_dir),
                                   "--port", "0", "--device", "cpu"], stderr=subprocess.PIPE, text=True)
        try:
            line = server.stderr.readline()
            while "serving" not in line:
                if not line:
                    raise SystemExit("the server did not start")
                line = server.stderr.readline()
            yield server, line.split(" at ")[1].split()[0]
        finally:
            server.terminate()
            server.wait(30)


def main() -> None:
    args = parse_args()
    data = bomb_png(args.side)
    with serving(args.images, args.model) as (server, url):
        before = status_of(server.pid)["VmRSS"]
        stop = threading.Event()
        latencies: list[float] = []
        sent = [0]

        def probe() -> None:
            while not stop.is_set():
                sent[0] += 1
                started = time.perf_counter()
                path = "api/health" if sent[0] % 2 else "api/search?id=1&k=5"
                try:
                    with urllib.request.urlopen(url + path, timeout=60) as response:
                        response.read()
                    latencies.append(time.perf_counter() - started)
                except OSError:
                    pass
                time.sleep(0.1)

        prober = threading.Thread(target=probe)
        prober.start()
        outcomes: list[tuple[int, str]] = []
        started = time.perf_counter()
        for _ in range(args.rounds):
            threads = [threading.Thread(target=lambda: outcomes.append(post(url, data, "bomb.png")))
                       for _ in range(args.uploads)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        seconds = time.perf_counter() - started
        stop.set()
        prober.join()
        peak = status_of(server.pid)["VmHWM"]
    latencies.sort()
    answers: dict[str, int] = {}
    for status, message in outcomes:
        answers[f"{status} {message}"] = answers.get(f"{status} {message}", 0) + 1
    print(f"upload: {args.side}x{args.side} 16-bit grey PNG, {len(data) / 1e3:.0f} KB "
          f"({args.side * args.side * 2 / 1e6:.0f} MB raster), {args.uploads} concurrent x {args.rounds} rounds, "
          f"model {args.model}")
    print(f"server RSS before {before} MB, peak {peak} MB (VmHWM); uploads answered in {seconds:.1f} s: {answers}")
    p95 = latencies[int(0.95 * (len(latencies) - 1))]
    print(f"probe (health / id search every 100 ms during the uploads): {len(latencies)} / {sent[0]} answered, "
          f"p50 {1000 * statistics.median(latencies):.0f} ms, p95 {1000 * p95:.0f} ms")
    out = write_result("serve_uploads", {"table": [{
        "upload": f"{args.side}x{args.side} 16-bit grey PNG", "concurrent x rounds": f"{args.uploads} x {args.rounds}",
        "server RSS before MB": before, "peak MB": peak, "answers": answers,
        "probe answered": f"{len(latencies)} / {sent[0]}", "probe p50 ms": round(1000 * statistics.median(latencies)),
        "probe p95 ms": round(1000 * p95)}]}, extra={"model": args.model})
    print(f"written {out}")


if __name__ == "__main__":
    main()
