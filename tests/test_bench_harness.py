"""bench/ is a package with one shared harness (issue 23 item 4): a result file names
the machine, load, versions and command of the run that printed its figures, and the
benches that share code run as ``python -m bench.<name>``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `bench` is a package at the repository root, not installed

from bench import harness

# The benches that import from bench/ (the harness or a sibling bench); their --help
# needs no optional extra (the heavy imports are inside functions).
CONVERTED = ("bucketing", "cpu_split", "dedup", "dedup_peers", "dedup_threshold", "descriptor_cost", "extract",
             "milvus_backend", "query", "query_verify", "ray_engine", "rerank", "rerun", "runtimes", "scale",
             "serve_concurrency", "serve_servers", "shard_dtype", "tables", "verify_copies", "whitening")


def test_write_result_writes_the_fields(tmp_path: Path) -> None:
    figures = {"rate": 12.5, "sizes": [1, 2]}
    out = harness.write_result("unit", figures, "python -m bench.unit --x 1", out=tmp_path / "r.json",
                               extra={"dim": 32})
    record = json.loads(out.read_text())
    assert record["command"] == "python -m bench.unit --x 1"
    assert record["figures"] == figures
    assert record["dim"] == 32
    assert record["machine"]["cpus"] == os.cpu_count()
    assert {"platform", "cpu_model", "memory_bytes"} <= set(record["machine"])
    assert len(record["load"]) == 3
    assert record["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert "numpy" in record["versions"]


def test_write_result_defaults_to_bench_results(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    out = harness.write_result("unit", [1])
    assert out.parent == tmp_path and out.name.startswith("unit-") and out.suffix == ".json"
    assert json.loads(out.read_text())["command"]  # this process's command line


@pytest.mark.parametrize("name", CONVERTED)
def test_converted_bench_help_runs_as_a_module(name: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", f"bench.{name}", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
