"""A private local Ray instance must not outlive the ``cbir`` run that started it,
even when that run is SIGKILLed (OOM killer, ``kill -9``).

Ray's own fate-sharing covers only part of that: the processes ``ray.init`` starts
(GCS, raylet, monitor, dashboard, log monitor) get ``PR_SET_PDEATHSIG`` and die
with the driver, and the workers die with their raylet -- but the DashboardAgent
and RuntimeEnvAgent, which the raylet starts, notice the raylet's death and then
try to report it to the GCS, which is dead too: they linger for Ray's publish
timeout (~60 s, ~200 MB together) on every kill, and longer on a loaded machine.

So the driver starts this watchdog right after the instance is up: a small
process in its own session (terminal signals to ``cbir`` do not reach it) that
blocks on a pipe from the driver. The pipe's end -- the driver closing it after
``ray.shutdown()`` or the kernel closing it when the driver dies -- is the signal
to SIGKILL what is left of that instance: the processes the driver started for
it, and every process the raylet started (they carry ``RAY_RAYLET_PID``). Each is
identified by pid *and* start time, so a recycled pid is never hit; nothing else
on the machine is touched (``ray stop`` would stop every Ray instance there).
Linux only (``/proc``); elsewhere Ray's own reaper process does this job.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterable

PROC = "/proc"


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat``
    field 22), None when it is gone: with the pid, a process's identity."""
    try:
        with open(f"{PROC}/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[19])  # fields after the command: state is field 3, starttime field 22


def _started_by_raylet(pid: int, raylet: int) -> bool:
    try:
        with open(f"{PROC}/{pid}/environ", "rb") as f:
            return f"RAY_RAYLET_PID={raylet}".encode() in f.read().split(b"\0")
    except OSError:  # gone, or not ours to read: not ours to kill either
        return False


def leftovers(node: dict[int, int], raylets: dict[int, int]) -> list[int]:
    """Live pids of the instance: ``node`` (pid -> start time) itself, and the
    processes a raylet in ``raylets`` (pid -> start time) started after it."""
    found = [pid for pid, started in node.items() if start_time(pid) == started]
    for name in os.listdir(PROC):
        if not name.isdigit() or int(name) in node or int(name) == os.getpid():
            continue
        pid = int(name)
        started = start_time(pid)
        if started is not None and any(started >= raylet_start and _started_by_raylet(pid, raylet)
                                       for raylet, raylet_start in raylets.items()):
            found.append(pid)
    return found


def kill(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _parse(args: list[str]) -> dict[int, int]:
    return {int(pid): int(started) for pid, started in (arg.split(":") for arg in args if arg)}


def main(argv: list[str]) -> None:
    """``ray_reaper NODE_PIDS RAYLET_PIDS``, each a comma-separated ``pid:start``
    list; waits for EOF on stdin, then kills what is left."""
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    node, raylets = _parse(argv[0].split(",")), _parse(argv[1].split(","))
    while sys.stdin.buffer.read(4096):
        pass
    kill(leftovers({**node, **raylets}, raylets))


class Reaper:
    """The driver's handle on the watchdog: :meth:`release` once the instance is
    shut down (what is left then is killed too); if the driver dies first, the
    kernel closes the pipe and the watchdog does the same."""

    def __init__(self, node: Iterable[int], raylets: Iterable[int]) -> None:
        def spec(pids: Iterable[int]) -> str:
            return ",".join(f"{pid}:{started}" for pid in pids if (started := start_time(pid)) is not None)

        self._process = subprocess.Popen(
            [sys.executable, "-m", __name__, spec(node), spec(raylets)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True)

    def release(self, timeout: float = 30.0) -> None:
        assert self._process.stdin is not None
        with contextlib.suppress(OSError):
            self._process.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout)


def supported() -> bool:
    return sys.platform.startswith("linux") and os.path.isdir(f"{PROC}/self")


if __name__ == "__main__":
    main(sys.argv[1:])
