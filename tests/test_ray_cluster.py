"""A real two-node Ray cluster on this machine (slow): a head and a worker node,
each started with ``ray start`` in its own process group, temp folder and ports,
stopped after the module (also when a test fails). Both nodes embed (the model
actors are spread, one per node), the worker node has no model cache of its own,
and the result equals the local engine's."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO
from ray_nodes import ENV, HAVE_RAY, START_TIMEOUT, free_port, start_head, stop_group

from cbir_cli.errors import CbirError
from cbir_cli.models.weights import OFFLINE_ENV
from cbir_cli.paths import CACHE_ENV
from cbir_cli.pipeline.options import ExtractOptions
from cbir_cli.pipeline.sync import sync_folder
from cbir_cli.search.check import check_index
from cbir_cli.store.feature_store import FeatureStore

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not HAVE_RAY or shutil.which("ray") is None,
                                                   reason="Ray is an optional extra: pip install 'cbir-cli[ray]'")]
# Logical slots per node: one model actor (1 CPU) plus decoding tasks (0.5 each).
NODE_CPUS = 2


def _start_worker(address: str, temp: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [shutil.which("ray") or "ray", "start", f"--address={address}", f"--num-cpus={NODE_CPUS}",
         "--disable-usage-stats", f"--temp-dir={temp}", f"--dashboard-agent-listen-port={free_port()}",
         f"--metrics-export-port={free_port()}", "--block"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


@pytest.fixture(scope="module")
def two_nodes():
    """(address, node ids) of a head + worker-node cluster this process drives."""
    import ray

    from cbir_cli.pipeline.ray_session import connect, disconnect

    os.environ.update(ENV)
    pythonpath = os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": pythonpath}
    head_temp = tempfile.mkdtemp(prefix="cbhead-", dir="/tmp")  # short: Ray's socket paths have a length limit
    node_temp = tempfile.mkdtemp(prefix="cbnode-", dir="/tmp")
    # The worker node sees no model cache of this machine and may not download.
    node_env = {**env, "TORCH_HOME": os.path.join(node_temp, "torch"), CACHE_ENV: os.path.join(node_temp, "cache"),
                OFFLINE_ENV: "1"}
    started: list[subprocess.Popen] = []
    try:
        head, address = start_head(head_temp, env)
        started.append(head)
        started.append(_start_worker(address, node_temp, node_env))
        connect(address)
        deadline = time.monotonic() + START_TIMEOUT
        while len(nodes := [n["NodeID"] for n in ray.nodes() if n.get("Alive")]) < 2:
            assert time.monotonic() < deadline, "the worker node never joined"
            assert started[1].poll() is None, "ray start of the worker node exited"
            time.sleep(0.5)
        yield address, set(nodes)
    except (RuntimeError, CbirError) as exc:
        pytest.fail(f"could not start a two-node Ray cluster: {exc}")
    finally:
        disconnect()
        for process in reversed(started):
            stop_group(process)
        shutil.rmtree(head_temp, ignore_errors=True)
        shutil.rmtree(node_temp, ignore_errors=True)


def test_both_nodes_embed_and_the_result_equals_the_local_engines(two_nodes, image_folder, tmp_path: Path,
                                                                  tiny_embedder):
    from ray.data import DataContext

    from cbir_cli.pipeline.ray_executor import RayExecutor, RayOptions

    address, nodes = two_nodes
    # Ray Data starts work as soon as one actor is up; on this loaded machine the
    # first one could embed all 8 parts before the other node's has loaded torch.
    DataContext.get_current().wait_for_min_actors_s = int(START_TIMEOUT)
    folder = image_folder(32)
    options = ExtractOptions(workers=0, batch_size=4, shard_size=4)
    local = sync_folder(folder, tmp_path / "local", model="test_tiny", options=options)
    with RayExecutor(options, RayOptions(address)) as executor:
        summary = sync_folder(folder, tmp_path / "ray", model="test_tiny", executor=executor, options=options)
    assert summary.embedded == local.embedded == 32
    assert [rows for rows, _ in executor.parts] == [4] * 8
    assert {node for _, node in executor.parts} == nodes  # both nodes produced parts
    a, b = FeatureStore.open(tmp_path / "local"), FeatureStore.open(tmp_path / "ray")
    assert [(r.id, r.path, r.sha256) for r in a.live_rows()] == [(r.id, r.path, r.sha256) for r in b.live_rows()]
    assert (a.load_vectors() * b.load_vectors()).sum(axis=1).min() >= 0.999
    assert check_index(tmp_path / "ray").ok
