"""Ray nodes started with ``ray start`` for the Ray tests, each in its own process
group (stopped by group: ``ray stop`` would stop every Ray on the machine), with
the environment that keeps Ray quiet and token-free on loopback."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import time

HAVE_RAY = importlib.util.find_spec("ray") is not None and importlib.util.find_spec("pyarrow") is not None
# Generous: a loaded 2-core machine took up to 12 s for a Ray start in the research runs.
START_TIMEOUT = 120.0
ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_LOG_LEVEL": "ERROR"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_group(head: subprocess.Popen) -> None:
    """Stop only our cluster (`ray stop` would stop every Ray on the machine)."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 30)):
        try:
            os.killpg(head.pid, sig)
            head.wait(wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def start_head(temp: str, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    head = subprocess.Popen(
        [shutil.which("ray") or "ray", "start", "--head", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}", "--block"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return head, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    stop_group(head)
    raise RuntimeError("ray start: the head's port never opened")
