"""Joining or starting a Ray cluster for the ray executor, quietly, and turning
Ray's failures into one-line errors. ``ray`` is imported here only, lazily: it is
an optional extra.

Addresses: ``auto`` (the cluster this machine belongs to -- ``$RAY_ADDRESS`` or
one started with ``ray start`` -- else a private local one for the run), ``local``
(always a private local one), ``host:port`` (a cluster's GCS) or
``ray://host:10001`` (Ray Client, a remote cluster). A local instance is started
with ``address="local"`` explicitly: a bare ``ray.init()`` silently attaches to
whatever cluster ``/tmp/ray`` last recorded; it is watched by
:mod:`.ray_reaper` so that none of it outlives this process, even a SIGKILLed one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Iterator
from typing import Any

from ..errors import CbirError
from .ray_reaper import Reaper, supported

_reaper: Reaper | None = None  # the watchdog of the private local instance this process started

RAY_EXTRA = "pip install 'cbir-cli[ray]'"
START_ATTEMPTS = 3
# Seconds a cluster's address may take to accept a connection.
REACH_TIMEOUT = 10.0
# Read by Ray at import or by the processes it starts: no usage-stats thread, no
# Ray Data INFO/progress lines on the console (its logger has its own handler).
QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_LOG_LEVEL": "ERROR", "RAY_DEDUP_LOGS": "0"}
# Only for a private local instance: no token auth (nothing else can reach it) and
# workers at normal priority like the local engine's (Ray's default is nice 15).
LOCAL_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_worker_niceness": "0"}
# The errors that mean a worker, actor, node or object was lost, not a bug.
LOST_WORKER_ERRORS = ("RayActorError", "WorkerCrashedError", "NodeDiedError", "ObjectLostError",
                      "OutOfMemoryError", "OwnerDiedError", "LocalRayletDiedError")


def require_ray() -> None:
    """A one-line error naming the extra when Ray Data is not installed."""
    import importlib.util

    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("pyarrow") is None:
        raise CbirError(f"the ray engine needs Ray Data, an optional extra: {RAY_EXTRA}")


def _import_ray() -> Any:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    import ray
    import ray.data  # configures its loggers: quieten them after that

    logging.getLogger("ray.data").setLevel(logging.CRITICAL)  # we report its errors ourselves
    return ray


def _quiet_data_context() -> None:
    from ray.data import DataContext

    with quiet_warnings():
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = ctx.enable_operator_progress_bars = False
        ctx.print_on_execution_start = ctx.enable_auto_log_stats = ctx.verbose_stats_logs = False


@contextlib.contextmanager
def quiet_warnings() -> Iterator[None]:
    """Ray's deprecation warnings about its own settings and about the one
    deprecated argument we need (``max_restarts``: Ray Data has no named
    replacement for it in 2.60) are not the user's business."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        yield


def _init(ray: Any, address: str) -> None:
    """``ray.init``, leaving this process's SIGTERM handling as it was: Ray installs
    its own, and SIGTERM belongs to the store's write transaction (commit what is
    done, then stop) and to whoever embeds this library."""
    import signal
    import threading

    quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main_thread else None
    try:
        if address == "local":
            for key, value in LOCAL_ENV.items():
                os.environ.setdefault(key, value)
            # At least 2 logical CPUs: one for the model actor, one for decoding tasks.
            ray.init(address="local", num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False, **quiet)
        else:
            ray.init(address=address, **quiet)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def starts_private_instance(address: str) -> bool:
    """Whether :func:`connect` to ``address`` would start a private local instance
    (nothing to join): then the caller may do on this machine what the instance
    would, before paying for its start."""
    if address == "local":
        return True
    if address != "auto" or os.environ.get("RAY_ADDRESS"):
        return False
    try:
        from ray._private.services import find_bootstrap_address
    except ImportError:  # another Ray: assume a cluster may be recorded
        return False
    return not find_bootstrap_address(None)


def _recorded_cluster_answers() -> bool:
    """Whether the cluster ``ray start`` recorded on this machine still answers (a
    stopped one leaves its address behind, and Ray would retry it for minutes)."""
    try:
        from ray._private.services import find_bootstrap_address
    except ImportError:  # another Ray: let ray.init decide
        return True
    try:
        check_reachable(find_bootstrap_address(None) or "")
    except CbirError:
        return False
    return True


def check_reachable(address: str, timeout: float = REACH_TIMEOUT) -> None:
    """A one-line :class:`CbirError` when nothing answers at a cluster ``address``
    (``host:port`` or ``ray://host:port``): Ray itself would retry for minutes,
    printing "Failed to connect to GCS" and ignoring SIGTERM."""
    import socket

    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise CbirError(f"{address}: not a Ray address (expected host:port, ray://host:port, auto or local)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        reason = "timed out" if isinstance(exc, socket.timeout) else exc.strerror or type(exc).__name__
        raise CbirError(f"could not connect to the Ray cluster at {address}: nothing answers there ({reason}); "
                        "check --ray-address (or $RAY_ADDRESS) and that the cluster is running") from None


def connect(address: str = "auto") -> bool:
    """Join or start Ray (see the module docstring); start-up is retried, with a
    back-off, because a loaded machine sometimes misses Ray's internal deadlines.
    Returns whether this call started the session (then :func:`disconnect` it);
    an already initialised session (a caller's) is used as it is."""
    require_ray()
    ray = _import_ray()
    if ray.is_initialized():
        _quiet_data_context()
        return False
    if address == "auto" and not os.environ.get("RAY_ADDRESS"):
        try:  # a cluster recorded by `ray start` on this machine; fails at once when none
            if starts_private_instance("auto") or not _recorded_cluster_answers():
                raise ConnectionError("no Ray cluster on this machine")
            _init(ray, "auto")
        except ConnectionError:
            address = "local"
        else:
            _quiet_data_context()
            return True
    elif address == "auto":
        address = os.environ["RAY_ADDRESS"]
    if address != "local":
        check_reachable(address)
    last: BaseException | None = None
    for attempt in range(START_ATTEMPTS):
        try:
            _init(ray, address)
            if address == "local":
                _watch_local_instance()
            _quiet_data_context()
            return True
        except Exception as exc:  # noqa: BLE001 - ConnectionError, RpcError (deadline exceeded), RuntimeError...
            last = exc
            with contextlib.suppress(Exception):
                ray.shutdown()  # also reaps a half-started local instance
            time.sleep(1.0 + attempt)
    where = "start Ray on this machine" if address == "local" else f"connect to the Ray cluster at {address}"
    raise CbirError(f"could not {where} after {START_ATTEMPTS} attempts ({_first_line(last)})")


def _watch_local_instance() -> None:
    """Start the watchdog of the instance ``ray.init`` just started here (its
    processes, from Ray's node record; without one, Ray's own fate-sharing is
    all there is)."""
    global _reaper
    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    processes = getattr(node, "all_processes", None)
    if not supported() or not isinstance(processes, dict):
        return
    def pids(infos: Any) -> list[int]:  # Ray's ProcessInfo records, each with its Popen
        found = (getattr(getattr(info, "process", None), "pid", None) for info in infos)
        return [pid for pid in found if isinstance(pid, int)]

    try:
        _reaper = Reaper([pid for infos in processes.values() for pid in pids(infos)],
                         pids(processes.get("raylet", [])))
    except OSError:  # no watchdog: the instance still ends with a clean exit, as before
        _reaper = None


def disconnect() -> None:
    import ray

    global _reaper
    ray.shutdown()
    if _reaper is not None:
        _reaper.release()
        _reaper = None


@contextlib.contextmanager
def ray_errors() -> Iterator[None]:
    """A lost worker, actor or node becomes a one-line :class:`CbirError` (what was
    committed stays; running again resumes). Errors in our own code keep their
    traceback: the tasks report domain errors as data, never by raising."""
    try:
        yield
    except Exception as exc:
        import ray.exceptions

        lost = tuple(getattr(ray.exceptions, name) for name in LOST_WORKER_ERRORS)
        if isinstance(exc, lost):
            raise CbirError(f"a Ray worker was lost ({_first_line(exc)}); the images committed so far are kept, "
                            "and running the same command again resumes") from None
        raise


def cluster_resources() -> dict[str, float]:
    import ray

    return dict(ray.cluster_resources())


def alive_nodes() -> int:
    import ray

    return max(1, sum(1 for node in ray.nodes() if node.get("Alive")))
