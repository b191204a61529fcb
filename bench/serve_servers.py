#!/usr/bin/env python3
"""Which WSGI server under ``cbir serve``: waitress (what it uses), gunicorn (gthread
worker) and Werkzeug's development server (what it used), side by side, same app.

    python -m bench.serve_servers                       # all three, ~2 minutes
    python -m bench.serve_servers --servers waitress --slow 800

Each server runs in its own process over the same small index (synthetic images,
the tiny test model: the app's work is not what is measured). For each, a probe
client asks ``/api/health`` and an id search every 50 ms, first on an idle server,
then while an attacker holds ``--slow`` connections sending a header line every
2 s and never finishing (slowloris), plus ``--idle`` connections that send
nothing. Printed per server: probe requests answered / sent, p50 and p95 latency,
how many attack connections were still open at the end (the server's timeouts
cut them), and the server's peak RSS.
"""

from __future__ import annotations

import argparse
import importlib.util
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py`: see bench/harness.py
from bench.harness import write_result

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py`: see bench/harness.py

SERVERS = ("waitress", "gunicorn", "werkzeug")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", default=",".join(SERVERS))
    p.add_argument("--slow", type=int, default=500, help="slowloris connections")
    p.add_argument("--idle", type=int, default=200, help="connections that send nothing")
    p.add_argument("--seconds", type=float, default=25.0, help="attack duration")
    p.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)  # child mode
    p.add_argument("--index", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    return p.parse_args()


def build_index(folder: Path, index_dir: Path) -> None:
    from cbir_cli.pipeline.options import ExtractOptions
    from cbir_cli.pipeline.sync import index_folder
    from tests.conftest import make_image  # tests/ as a namespace package: the repository root is on sys.path

    folder.mkdir(parents=True)
    for i in range(20):
        make_image(i).save(folder / f"img_{i:03d}.jpg", quality=90)
    index_folder(folder, index_dir, model="test_tiny", options=ExtractOptions(workers=0))


def serve(kind: str, index_dir: Path, port_file: Path) -> None:
    """Child: serve the app with ``kind`` on a free port, written to ``port_file``."""
    from cbir_cli.serve.app import create_app

    app = create_app(index_dir=index_dir, device="cpu")
    if kind == "waitress":
        from cbir_cli.serve.app import make_http_server

        server = make_http_server(app, "127.0.0.1", 0)
        port_file.write_text(str(server.port))
        server.serve_forever()
    elif kind == "werkzeug":
        from werkzeug.serving import make_server

        server = make_server("127.0.0.1", 0, app, threaded=True)
        port_file.write_text(str(server.port))
        server.serve_forever()
    else:
        from gunicorn.app.base import BaseApplication

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]

        class Gunicorn(BaseApplication):
            def load_config(self) -> None:
                for key, value in {"bind": f"127.0.0.1:{port}", "workers": 1, "worker_class": "gthread",
                                   "threads": 16, "timeout": 30, "loglevel": "error"}.items():
                    self.cfg.set(key, value)

            def load(self):
                return app

        port_file.write_text(str(port))
        Gunicorn().run()


def tree_peak_rss_mb(pid: int) -> float:
    """Peak RSS (VmHWM) of a process plus its children (gunicorn's worker)."""
    total = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            status = (proc / "status").read_text()
        except OSError:
            continue
        ppid = int(status.split("PPid:")[1].split()[0])
        if int(proc.name) == pid or ppid == pid:
            total += int(status.split("VmHWM:")[1].split()[0])
    return total / 1024


def probe(url: str, stop: threading.Event, latencies: list[float], sent: list[int]) -> None:
    paths = ["api/health", "api/search?id=3&k=5"]
    while not stop.is_set():
        sent[0] += 1
        started = time.perf_counter()
        try:
            with urllib.request.urlopen(url + paths[sent[0] % 2], timeout=10) as response:
                response.read()
            latencies.append(time.perf_counter() - started)
        except OSError:
            pass
        time.sleep(0.05)


def slowloris(port: int, slow: int, idle: int, stop: threading.Event, open_at_end: list[int]) -> None:
    conns = []
    for i in range(slow + idle):
        try:
            conn = socket.create_connection(("127.0.0.1", port), timeout=2)
            conn.setblocking(False)
            if i < slow:
                conn.send(b"GET /api/health HTTP/1.1\r\nHost: x\r\n")
            conns.append(conn)
        except OSError:
            pass
    while not stop.wait(2.0):
        for conn in conns[:slow]:
            try:
                conn.send(b"X-a: b\r\n")
            except OSError:
                pass
    alive = 0
    for conn in conns:
        try:
            alive += conn.recv(1) != b""  # b"" = closed by the server
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
        conn.close()
    open_at_end[0] = alive


def measure(kind: str, index_dir: Path, args: argparse.Namespace, tmp: Path) -> dict:
    port_file = tmp / f"{kind}.port"
    child = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--index", str(index_dir),
                              "--port-file", str(port_file)])
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists() or not port_file.read_text():
            time.sleep(0.2)
            if time.monotonic() > deadline:
                raise SystemExit(f"{kind} did not start")
        port = int(port_file.read_text())
        url = f"http://127.0.0.1:{port}/"
        while True:
            try:
                urllib.request.urlopen(url + "api/health", timeout=2).read()
                break
            except OSError:
                time.sleep(0.2)
        result = {}
        for phase in ("idle", "attack"):
            stop = threading.Event()
            latencies: list[float] = []
            sent = [0]
            open_at_end = [0]
            attacker = threading.Thread(target=slowloris, args=(port, args.slow, args.idle, stop, open_at_end)) \
                if phase == "attack" else None
            if attacker:
                attacker.start()
                time.sleep(1.0)
            prober = threading.Thread(target=probe, args=(url, stop, latencies, sent))
            prober.start()
            time.sleep(args.seconds if attacker else 5.0)
            stop.set()
            prober.join()
            if attacker:
                attacker.join()
            latencies.sort()
            result[phase] = {
                "answered": len(latencies), "sent": sent[0],
                "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
                "p95_ms": 1000 * latencies[int(0.95 * (len(latencies) - 1))] if latencies else float("nan"),
                "attack_open_at_end": open_at_end[0],
            }
        result["peak_rss_mb"] = tree_peak_rss_mb(child.pid)
        return result
    finally:
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()


def main() -> None:
    args = parse_args()
    if args.serve:
        serve(args.serve, args.index, args.port_file)
        return
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        build_index(tmp / "images", tmp / "index")
        rows = []
        for kind in args.servers.split(","):
            if kind == "gunicorn" and importlib.util.find_spec("gunicorn") is None:
                print("gunicorn: not installed (pip install gunicorn), skipped", flush=True)
                continue
            r = measure(kind, tmp / "index", args, tmp)
            rows.append((kind, r))
            print(f"{kind}: {r}", flush=True)
    print(f"\nslowloris: {args.slow} connections adding a header line every 2 s + {args.idle} silent ones, "
          f"{args.seconds:.0f} s; probe: health + id search every 50 ms")
    print("| server | idle: answered, p50 ms | attack: answered / sent | p50 ms | p95 ms "
          "| attack connections still open at the end | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for kind, r in rows:
        idle, attack = r["idle"], r["attack"]
        print(f"| {kind} | {idle['answered']}/{idle['sent']}, {idle['p50_ms']:.1f} | {attack['answered']} / "
              f"{attack['sent']} | {attack['p50_ms']:.1f} | {attack['p95_ms']:.1f} | "
              f"{attack['attack_open_at_end']} of {args.slow + args.idle} | {r['peak_rss_mb']:.0f} |")
    out = write_result("serve_servers", {"table": [
        {"server": kind, "idle answered": f"{r['idle']['answered']}/{r['idle']['sent']}",
         "idle p50 ms": round(r["idle"]["p50_ms"], 1),
         "attack answered": f"{r['attack']['answered']} / {r['attack']['sent']}",
         "attack p50 ms": round(r["attack"]["p50_ms"], 1), "attack p95 ms": round(r["attack"]["p95_ms"], 1),
         "attack connections open at end": r["attack"]["attack_open_at_end"], "peak RSS MB": round(r["peak_rss_mb"])}
        for kind, r in rows]})
    print(f"written {out}")


if __name__ == "__main__":
    main()
