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
waits on a pipe from the driver and meanwhile, once a second, notes the children
of the instance's processes (the raylet's agents and workers): once the raylet is
dead they are orphans no longer found that way, and their environment, which
names the raylet, is not reliable (Ray's process titles can overwrite it). The
pipe's end -- the driver closing it after ``ray.shutdown()``, or the kernel
closing it when the driver dies -- is the signal to SIGKILL what is left: the
processes the driver started for the instance, the children noted, and any
other process still naming its raylet in ``RAY_RAYLET_PID`` (one started since
the last look). Each is identified by pid *and* start time, so a recycled pid is
never hit; nothing else on the machine is touched (``ray stop`` would stop every
Ray instance there). Linux only (``/proc``); elsewhere Ray's own reaper process
does this job.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterable

PROC = "/proc"
POLL_S = 1.0  # how often the children are noted


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks since boot) from ``/proc/PID/stat``
    (fields 4 and 22), None when the process is gone."""
    try:
        with open(f"{PROC}/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # after the command: field 3 on
        return int(fields[1]), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def start_time(pid: int) -> int | None:
    """With the pid, a process's identity; None when it is gone."""
    stat = _stat(pid)
    return stat[1] if stat else None


def _pids() -> list[int]:
    return [int(name) for name in os.listdir(PROC) if name.isdigit()]


def children(parents: dict[int, int]) -> dict[int, int]:
    """pid -> start time of the live children of ``parents`` (pid -> start time,
    still those processes)."""
    alive = {pid for pid, started in parents.items() if start_time(pid) == started}
    found = {}
    for pid in _pids():
        stat = _stat(pid)
        if stat is not None and stat[0] in alive:
            found[pid] = stat[1]
    return found


def _started_by_raylet(pid: int, raylet: int) -> bool:
    try:
        with open(f"{PROC}/{pid}/environ", "rb") as f:
            return f"RAY_RAYLET_PID={raylet}".encode() in f.read().split(b"\0")
    except OSError:  # gone, or not ours to read: not ours to kill either
        return False


def leftovers(node: dict[int, int], raylets: dict[int, int]) -> list[int]:
    """Live pids of the instance: ``node`` (pid -> start time) itself, and the
    processes naming a raylet in ``raylets`` (pid -> start time), started after it."""
    found = [pid for pid, started in node.items() if start_time(pid) == started]
    for pid in _pids():
        if pid in node or pid == os.getpid():
            continue
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
    list; notes their children until EOF on stdin, then kills what is left."""
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    node, raylets = _parse(argv[0].split(",")), _parse(argv[1].split(","))
    node.update(raylets)
    known = {**node, **children(node)}
    stdin = sys.stdin.fileno()
    while True:
        ready, _, _ = select.select([stdin], [], [], POLL_S)
        if ready and not os.read(stdin, 4096):
            break
        known.update(children(node))
    kill(leftovers(known, raylets))


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
