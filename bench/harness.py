"""What every benchmark shares: where things are, timing, load, peak memory, a
description of the machine and library versions, and the result file.

Each bench ends with :func:`write_result`, which writes
``bench/results/<name>-<timestamp>.json`` holding ``machine``, ``load``,
``versions``, ``command``, ``date`` and ``figures``, so a figure quoted in the docs names
the run (and the machine, load and versions) that printed it. A bench whose figures
hold a ``"table"`` (a list of rows, each a dict of column -> value, as the bench
prints it) gets a markdown table in the docs from :mod:`bench.tables`.

Run a bench as ``python -m bench.<name>`` from the repository root. ``python
bench/<name>.py`` also works: a script run by path has no package and only
``bench/`` on ``sys.path``, so each script that imports from ``bench`` starts with
ONE bootstrap line that puts the repository root on ``sys.path``::

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py`: see bench/harness.py
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
# ../shared next to the checkout, or $CBIR_SHARED (as the tests find it).
SHARED = Path(os.environ.get("CBIR_SHARED", REPO.parent / "shared")) / "datasets"
# Distributions whose versions move the figures; those not installed are left out.
LIBRARIES = ("cbir-cli", "numpy", "faiss-cpu", "faiss-gpu", "torch", "torchvision", "onnxruntime",
             "onnxruntime-gpu", "openvino", "pillow", "pillow-simd", "pymilvus", "ray", "waitress")


def percentiles_ms(seconds: list[float]) -> tuple[float, float]:
    """p50 and p95 of ``seconds``, in milliseconds."""
    import numpy as np

    ms = np.asarray(seconds) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 95))


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (the machine is shared: say how busy it was)."""
    return list(os.getloadavg())


def peak_rss_mib() -> tuple[float, float]:
    """Peak resident set size (MiB, ru_maxrss) of this process and of its largest waited-for child."""
    self_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return self_kib / 1024, child_kib / 1024


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            return int(fh.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None


def machine() -> dict[str, Any]:
    """Cores, CPU model, memory and platform of this machine."""
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "cpu_model": cpu_model(),
            "memory_bytes": memory_bytes()}


def versions() -> dict[str, str]:
    """Python, the installed libraries of :data:`LIBRARIES` (from package metadata: nothing
    is imported) and the git commit of the checkout."""
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if git.returncode == 0:
            found["commit"] = git.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return found


def command_line() -> str:
    """How this process was started, as one could retype it (``python -m bench.x ...``)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    head = ["-m", spec.name] if spec is not None and spec.name else sys.argv[:1]
    return " ".join([Path(sys.executable).name, *head, *sys.argv[1:]])


def write_result(name: str, figures: Any, command: str | None = None, *, out: Path | None = None,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write one run's result as JSON and return its path.

    Args:
        name: the bench's name (the file is ``<name>-<timestamp>.json``).
        figures: what the run measured (anything ``json`` can write); a dict with a
            ``"table"`` (a list of dicts: column -> value) is rendered into the docs by
            :mod:`bench.tables`.
        command: the command line; default, this process's (:func:`command_line`).
        out: write here instead of ``bench/results/``.
        extra: more top-level fields (a bench's settings), next to the standard ones.

    Returns:
        The path written.
    """
    path = out or RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    record = {"name": name, "command": command or command_line(), "date": time.strftime("%Y-%m-%d"),
              "machine": machine(), "load": load_average(), "versions": versions(), **(extra or {}),
              "figures": figures}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    return path
