"""``cbir index s3://... --engine ray`` against the tests' real S3-compatible
server (:mod:`s3_server`): listed through the object store, hashed and decoded by
the Ray workers, which read the objects themselves; the vectors equal the local
engine's. A private Ray instance (``--ray-address local``) in a subprocess: its
workers inherit the AWS variables, as a cluster's nodes get them from their
environment or instance role."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from typer.testing import CliRunner

pytest.importorskip("s3fs", reason="the s3 extra (fsspec + s3fs) is not installed")
pytest.importorskip("moto.server", reason="moto[server] (test extra) is not installed")
pytest.importorskip("boto3")
if importlib.util.find_spec("ray") is None or importlib.util.find_spec("pyarrow") is None:
    pytest.skip("Ray is an optional extra: pip install 'cbir-cli[ray]'", allow_module_level=True)

from cbir_cli.cli import app
from cbir_cli.search.check import check_index
from cbir_cli.store.feature_store import FeatureStore

pytest_plugins = ["s3_server"]
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_LOG_LEVEL": "ERROR"}


def test_index_of_a_bucket_on_ray_equals_the_local_engine(bucket, tmp_path):
    for i in range(10):
        bucket.put_image(f"p/{'sub/' if i % 2 else ''}img_{i}.jpg", i)
    bucket.put("p/broken.jpg", b"\xff\xd8\xff\xe0 this is not a JPEG")
    common = ["--model", "test_tiny", "--batch-size", "4", "--shard-size", "4", "--json"]
    local = CliRunner().invoke(app, ["index", bucket.uri("p"), "--index", str(tmp_path / "local"), "--workers", "0",
                                     *common])
    assert local.exit_code == 0, local.output

    pythonpath = os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, **RAY_ENV, **bucket.env, "PYTHONPATH": pythonpath}
    env.pop("RAY_ADDRESS", None)
    ray = subprocess.run([sys.executable, "-m", "cbir_cli.cli", "index", bucket.uri("p"), "--index",
                          str(tmp_path / "ray"), "--engine", "ray", "--ray-address", "local", *common],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert ray.returncode == 0, ray.stderr
    summary = json.loads(ray.stdout)
    assert (summary["embedded"], summary["skipped"]) == (10, 1)
    assert ray.stderr.splitlines() == [line for line in local.stderr.splitlines() if "broken.jpg" in line]
    a, b = FeatureStore.open(tmp_path / "local"), FeatureStore.open(tmp_path / "ray")
    assert [r.path for r in a.live_rows()] == [r.path for r in b.live_rows()]
    assert all(r.path.startswith(bucket.uri("p/")) for r in b.live_rows())
    assert (a.load_vectors() * b.load_vectors()).sum(axis=1).min() >= 0.999
    np.testing.assert_allclose(a.load_vectors(), b.load_vectors(), atol=1e-5)
    assert check_index(tmp_path / "ray").ok
