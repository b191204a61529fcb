"""The Ray executor on a real Ray cluster on loopback (``ray start --head`` in its
own process group, one per test session; skipped with the reason when the extra is
missing): it lists, hashes and embeds like the local executor, into the same
store, and a killed driver or worker resumes like a local run.

Timing-free by design: the machine running this is shared and loaded, so
start-up is retried and the kill waits for the first commit instead of a clock.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image
from ray_nodes import ENV, HAVE_RAY, free_port, start_head, stop_group
from typer.testing import CliRunner

from cbir_cli.cli import app
from cbir_cli.errors import CbirError
from cbir_cli.imageio.files import list_images
from cbir_cli.models.weights import OFFLINE_ENV
from cbir_cli.paths import CACHE_ENV
from cbir_cli.pipeline.local import LocalExecutor
from cbir_cli.pipeline.options import ExtractOptions
from cbir_cli.pipeline.sync import sync_folder
from cbir_cli.search.check import check_index
from cbir_cli.store.feature_store import FeatureStore
from tests.fakes import FakeEmbedder, PoisonEmbedder

REPO = Path(__file__).resolve().parents[1]
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="Ray is an optional extra: pip install 'cbir-cli[ray]'")
RUN_TIMEOUT = 300.0


@pytest.fixture(scope="module")
def ray_cluster():
    """A loopback Ray cluster (2 CPUs) this test process is connected to, as a
    driver; its address for drivers in other processes. Start-up is retried. (One
    per session: this module is its only user; it ends with the module, so other
    modules' tests never run beside a connected Ray driver.)"""
    if not HAVE_RAY or shutil.which("ray") is None:
        pytest.skip("Ray is an optional extra: pip install 'cbir-cli[ray]'")
    from cbir_cli.pipeline.ray_session import connect, disconnect

    os.environ.update(ENV)
    pythonpath = os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": pythonpath}
    temp = tempfile.mkdtemp(prefix="cbray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    # The node's processes see no model cache of this machine (and may not
    # download): whatever weights they use came through Ray.
    node_env = {**env, "TORCH_HOME": os.path.join(temp, "node-torch"), CACHE_ENV: os.path.join(temp, "node-cache"),
                OFFLINE_ENV: "1"}
    errors = []
    for _ in range(3):
        head = None
        try:
            head, address = start_head(temp, node_env)
            connect(address)  # itself retried: the raylet may register seconds after the port opens
            break
        except (RuntimeError, CbirError) as exc:
            errors.append(str(exc))
            if head is not None:
                stop_group(head)
    else:
        shutil.rmtree(temp, ignore_errors=True)
        pytest.fail(f"could not start a loopback Ray cluster: {errors}")
    yield address, env
    disconnect()
    stop_group(head)
    shutil.rmtree(temp, ignore_errors=True)


def ray_executor(**options):
    from cbir_cli.pipeline.ray_executor import RayExecutor, RayOptions

    return RayExecutor(ExtractOptions(**{"workers": 0, **options}), RayOptions("auto"))


def write_tree(root: Path, n: int) -> Path:
    """n images spread over nested folders, plus what the lister must handle: a
    symlinked folder (not entered), a folder named like an image, a bad file."""
    for i in range(n):
        folder = root / ("" if i % 3 == 0 else f"sub{i % 3}") / ("deep" if i % 5 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        make_image(i).save(folder / f"img_{i:03d}.jpg", quality=90)
    (root / "folder.jpg").mkdir()
    (root / "not_an_image.png").write_bytes(b"this is text")
    os.symlink(root / "sub1", root / "link_to_sub1")
    return root


def vectors_by_path(store: FeatureStore) -> dict[str, np.ndarray]:
    return dict(zip([r.path for r in store.live_rows()], store.load_vectors()))


def test_without_the_extra_the_ray_engine_is_one_line_naming_it(image_folder, tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ray" else real_find_spec(name, *a))
    result = CliRunner().invoke(app, ["extract", str(image_folder(2)), "--out", str(tmp_path / "out"),
                                      "--model", "test_tiny", "--engine", "ray"])
    assert result.exit_code == 1
    assert result.stderr == "error: the ray engine needs Ray Data, an optional extra: pip install 'cbir-cli[ray]'\n"
    assert not (tmp_path / "out").exists()


@needs_ray
@pytest.mark.parametrize("decode", ["gpu", "nvimgcodec"])
def test_decoding_on_the_models_device_is_refused_in_one_line(image_folder, tmp_path, decode, monkeypatch):
    """Ray decodes in CPU tasks: a device decoder there would silently not be used."""
    from cbir_cli.imageio import nvimgcodec_decode

    monkeypatch.setattr(nvimgcodec_decode, "nvimgcodec_available", lambda: True)  # the refusal, not the extra
    result = CliRunner().invoke(app, ["extract", str(image_folder(2)), "--out", str(tmp_path / "out"),
                                      "--model", "test_tiny", "--engine", "ray", "--decode", decode])
    assert result.exit_code == 1
    assert result.stderr == (f"error: JPEG decoding on the model's device ({decode}) is not available with the ray "
                             "engine: it decodes in CPU tasks\n")
    assert not (tmp_path / "out").exists()


@needs_ray
def test_listing_and_hashing_in_ray_tasks_match_the_local_executor(ray_cluster, tmp_path):
    # Joining Ray left this process's SIGTERM handling alone (Ray installs its own;
    # SIGTERM belongs to the store's write transaction).
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    root = write_tree(tmp_path / "tree", 14)
    with ray_executor() as executor:
        listed = executor.list_images(root)
        assert listed == list_images(root)  # same files, same order, symlinked folder not entered
        files = [*listed, root / "folder.jpg"]
        assert sorted(executor.hash_files(files)) == sorted(LocalExecutor(ExtractOptions(workers=0)).hash_files(files))
        for bad, local_error in ((tmp_path / "missing", "folder does not exist"),
                                 (tmp_path / "tree" / "not_an_image.png", "not a folder")):
            with pytest.raises(CbirError, match=local_error):
                executor.list_images(bad)


@needs_ray
def test_decoding_is_never_fused_into_the_model_actor(ray_cluster, tmp_path):
    import contextlib
    import io

    from cbir_cli.pipeline.executor import EmbedRequest
    from cbir_cli.pipeline.ray_model import model_plan

    with ray_executor(batch_size=4, shard_size=8) as executor:
        items = [(f"/x/{i}.jpg", f"{i:064x}", 1) for i in range(40)]
        dataset = executor.pipeline(items, model_plan(EmbedRequest("test_tiny")), tmp_path, "float32")
        plan = io.StringIO()
        with contextlib.redirect_stdout(plan):
            dataset.explain()
    physical = plan.getvalue().split("Physical Plan (Optimized)")[-1]
    assert "ActorPoolMapOperator[MapBatches(EmbedAndStage)]" in physical, physical
    assert "TaskPoolMapOperator[MapBatches(decode_batch)]" in physical, physical


@needs_ray
def test_ray_extraction_equals_local_extraction_and_resyncs_incrementally(ray_cluster, tmp_path, tiny_embedder):
    root = write_tree(tmp_path / "tree", 30)
    options = {"batch_size": 4, "shard_size": 8}
    local_skips: list[tuple[str, str]] = []
    ray_skips: list[tuple[str, str]] = []
    local = sync_folder(root, tmp_path / "local", embedder=tiny_embedder, options=ExtractOptions(workers=0, **options),
                        on_skip=lambda p, r: local_skips.append((p, r)))
    with ray_executor(**options) as executor:
        summary = sync_folder(root, tmp_path / "ray", embedder=tiny_embedder, executor=executor,
                              options=ExtractOptions(workers=0, **options),
                              on_skip=lambda p, r: ray_skips.append((p, r)))
    assert (summary.embedded, summary.skipped) == (local.embedded, local.skipped) == (30, 1)
    assert ray_skips == local_skips  # the same one-line reason for the bad file
    a, b = FeatureStore.open(tmp_path / "local"), FeatureStore.open(tmp_path / "ray")
    assert [(r.id, r.path, r.sha256) for r in a.live_rows()] == [(r.id, r.path, r.sha256) for r in b.live_rows()]
    cosines = (a.load_vectors() * b.load_vectors()).sum(axis=1)
    assert cosines.min() >= 0.999, cosines.min()
    assert check_index(tmp_path / "ray").ok and b.leftover_files() == []
    assert not (tmp_path / "ray" / "staging").exists()

    # Incremental, like a local run: only the changed and the new file are embedded.
    make_image(100).save(root / "img_003.jpg", quality=90)
    make_image(101).save(root / "sub1" / "new.jpg", quality=90)
    (root / "sub2" / "img_002.jpg").unlink()
    with ray_executor(**options) as executor:
        again = sync_folder(root, tmp_path / "ray", embedder=tiny_embedder, executor=executor,
                            options=ExtractOptions(workers=0, **options))
    assert (again.embedded, again.added, again.updated, again.removed) == (2, 1, 1, 1)
    assert FeatureStore.open(tmp_path / "ray").count == 30


@needs_ray
def test_a_new_store_streams_from_listing_to_commits_with_no_file_list_on_the_driver(ray_cluster, tmp_path,
                                                                                     tiny_embedder):
    """A new store's run was planned on the driver: every file listed into one
    list, hashed in tasks the driver fed, then sent to Ray Data as one items table
    (the driver's memory grew with the files to embed). Now it is one streaming Ray
    Data job (listing, stat and hashing on the workers); the driver's executor is
    never handed the files, and the result is the local engine's, stat cache included."""
    from cbir_cli.pipeline.ray_executor import RayExecutor, RayOptions

    root = write_tree(tmp_path / "tree", 30)
    hour_ago = time.time() - 3600  # settled files: their stamps are worth caching
    for path in root.rglob("*.*"):
        if path.is_file():
            os.utime(path, (hour_ago, hour_ago))
    handed: list[tuple[str, int]] = []
    listings: list = []

    class Spy(RayExecutor):
        def list_images(self, root):
            listings.append(super().list_images(root))
            return listings[-1]

        def hash_files(self, paths):
            handed.append(("hash_files", len(paths)))
            yield from super().hash_files(paths)

        def embed(self, items, *args):
            handed.append(("embed", len(items)))
            return super().embed(items, *args)

    options = ExtractOptions(workers=0, batch_size=3, shard_size=8)
    local_skips: list[tuple[str, str]] = []
    ray_skips: list[tuple[str, str]] = []
    sync_folder(root, tmp_path / "local", embedder=tiny_embedder, options=options,
                on_skip=lambda p, r: local_skips.append((p, r)))
    with Spy(options, RayOptions("auto")) as executor:
        summary = sync_folder(root, tmp_path / "ray", embedder=tiny_embedder, executor=executor, options=options,
                              on_skip=lambda p, r: ray_skips.append((p, r)))
    assert handed == []  # no list of files went through the driver
    assert getattr(listings[0], "materialised", True) is False
    assert (summary.files, summary.embedded, summary.added, summary.skipped) == (31, 30, 30, 1)
    assert ray_skips == local_skips
    a, b = FeatureStore.open(tmp_path / "local"), FeatureStore.open(tmp_path / "ray")
    assert [(r.id, r.path, r.sha256) for r in a.live_rows()] == [(r.id, r.path, r.sha256) for r in b.live_rows()]
    assert np.array_equal(a.load_vectors(), b.load_vectors())
    assert b.manifest["skipped"] == a.manifest["skipped"]
    # Whole shards, whatever each folder held (the bad file leaves a hole in one).
    assert sum(rows for rows, _ in executor.parts) == 30 and len(executor.parts) == 4
    assert check_index(tmp_path / "ray").ok and not (tmp_path / "ray" / "staging").exists()

    # The workers' stamps made the stat cache: an unchanged re-run hashes nothing.
    handed.clear()
    with Spy(options, RayOptions("auto")) as executor:
        again = sync_folder(root, tmp_path / "ray", embedder=tiny_embedder, executor=executor, options=options)
    assert (again.unchanged, again.embedded, again.removed) == (30, 0, 0)
    assert handed == [("hash_files", 0)]


@needs_ray
def test_ray_workers_write_float16_parts_into_a_float16_store(ray_cluster, image_folder, tmp_path, tiny_embedder):
    """Workers write parts in the store's shard dtype (the driver adopts them
    unread; a float32 part would be refused as damaged)."""
    import numpy as np

    folder = image_folder(10)
    options = {"batch_size": 4, "shard_size": 4, "shard_dtype": "float16"}
    sync_folder(folder, tmp_path / "local", embedder=tiny_embedder, options=ExtractOptions(workers=0, **options))
    with ray_executor(**options) as executor:
        sync_folder(folder, tmp_path / "ray", embedder=tiny_embedder, executor=executor,
                    options=ExtractOptions(workers=0, **options))
    a, b = FeatureStore.open(tmp_path / "local"), FeatureStore.open(tmp_path / "ray")
    assert b.shard_dtype == "float16" and b.count == 10 and len(b.manifest["shards"]) > 1
    assert {str(np.load(b.shard_paths(s)[0], mmap_mode="r").dtype) for s in b.manifest["shards"]} == {"float16"}
    assert [r.path for r in a.live_rows()] == [r.path for r in b.live_rows()]
    assert (a.load_vectors() * b.load_vectors()).sum(axis=1).min() >= 0.999
    assert check_index(tmp_path / "ray").ok


@needs_ray
def test_vectors_the_store_refuses_are_skipped_files_as_in_the_local_engine(ray_cluster, image_folder, tmp_path):
    folder = image_folder(12)
    local_skips: list[tuple[str, str]] = []
    ray_skips: list[tuple[str, str]] = []
    sync_folder(folder, tmp_path / "local", embedder=PoisonEmbedder(), options=ExtractOptions(workers=0),
                on_skip=lambda p, r: local_skips.append((p, r)))
    with ray_executor() as executor:
        sync_folder(folder, tmp_path / "ray", embedder=PoisonEmbedder(), executor=executor,
                    options=ExtractOptions(workers=0), on_skip=lambda p, r: ray_skips.append((p, r)))
    assert 0 < len(local_skips) < 12 and sorted(ray_skips) == sorted(local_skips)
    a, b = FeatureStore.open(tmp_path / "local"), FeatureStore.open(tmp_path / "ray")
    assert [r.path for r in a.live_rows()] == [r.path for r in b.live_rows()]
    assert a.manifest["skipped"] == b.manifest["skipped"]


@needs_ray
def test_parts_are_whole_shards_whatever_the_batch_size(ray_cluster, image_folder, tmp_path, tiny_embedder):
    """Ray Data cut a remainder batch out of every input block, so parts (each a
    shard and a commit) of 1 or 2 rows appeared mid-run ([1024, 2, 334] was seen).
    Parts are whole shards now; only the last one is short."""
    folder = image_folder(30)
    options = {"batch_size": 3, "shard_size": 8}
    with ray_executor(**options) as executor:
        summary = sync_folder(folder, tmp_path / "ray", embedder=tiny_embedder, executor=executor,
                              options=ExtractOptions(workers=0, **options))
    assert summary.embedded == 30
    assert [shard["rows"] for shard in FeatureStore.open(tmp_path / "ray").manifest["shards"]] == [8, 8, 8, 6]
    assert [rows for rows, _ in executor.parts] == [8, 8, 8, 6]


@needs_ray
def test_the_model_reaches_a_node_without_a_model_cache_through_ray(ray_cluster, image_folder, tmp_path):
    """The cluster's processes have an empty TORCH_HOME and CBIR_CACHE and may not
    download (see ray_cluster): the weights come from this driver's cache through
    Ray's object store, and the vectors are the local engine's."""
    from cbir_cli.models.weights import torch_hub_checkpoint_dir

    if not (torch_hub_checkpoint_dir() / "mobilenet_v2-b0353104.pth").is_file():
        pytest.skip("mobilenet_v2's weights are not in this machine's cache (cbir weights install mobilenet_v2)")
    folder = image_folder(4)
    options = {"batch_size": 4, "shard_size": 4, "precision": "fp32", "runtime": "torch", "device": "cpu"}
    sync_folder(folder, tmp_path / "local", model="mobilenet_v2", options=ExtractOptions(workers=0, **options))
    with ray_executor(**options) as executor:
        sync_folder(folder, tmp_path / "ray", model="mobilenet_v2", executor=executor,
                    options=ExtractOptions(workers=0, **options))
    a, b = FeatureStore.open(tmp_path / "local"), FeatureStore.open(tmp_path / "ray")
    assert a.fingerprint == b.fingerprint and [r.path for r in a.live_rows()] == [r.path for r in b.live_rows()]
    assert (a.load_vectors() * b.load_vectors()).sum(axis=1).min() >= 0.999


def test_with_a_private_instance_an_empty_folder_fails_before_ray_starts(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    from cbir_cli.pipeline import ray_executor as module

    def no_ray(*_: object) -> bool:
        raise AssertionError("Ray was started for an empty folder")

    monkeypatch.setattr(module, "connect", no_ray)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty tree" / "a" / "b").mkdir(parents=True)  # a streamed listing would find that out on Ray
    with module.RayExecutor(ExtractOptions(workers=0), module.RayOptions("local")) as executor:
        with pytest.raises(CbirError, match="empty: no image files found"):
            executor.list_images(tmp_path / "empty")
        with pytest.raises(CbirError, match="empty tree: no image files found"):
            executor.list_images(tmp_path / "empty tree")
        with pytest.raises(CbirError, match="missing: folder does not exist"):
            executor.list_images(tmp_path / "missing")


def driver_env() -> dict[str, str]:
    pythonpath = os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, **ENV, "PYTHONPATH": pythonpath}
    env.pop("RAY_ADDRESS", None)
    return env


@needs_ray
def test_a_wrong_ray_address_fails_at_once_in_one_line(image_folder, tmp_path):
    """Ray retries a dead address for 10+ minutes, printing "Failed to connect to
    GCS" and ignoring SIGTERM; the timeout here is only the test's guard."""
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    result = subprocess.run(
        [sys.executable, "-m", "cbir_cli.cli", "extract", str(image_folder(2)), "--out", str(tmp_path / "out"),
         "--model", "test_tiny", "--engine", "ray", "--ray-address", address],
        env=driver_env(), cwd=REPO, capture_output=True, text=True, timeout=90)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: could not connect to the Ray cluster at {address}: nothing answers there (Connection refused); "
        "check --ray-address (or $RAY_ADDRESS) and that the cluster is running"], result.stderr
    assert not (tmp_path / "out").exists()


def small_images(folder: Path, n: int) -> Path:
    folder.mkdir()
    for i in range(n):
        make_image(i, size=(64, 48)).save(folder / f"img_{i:03d}.jpg", quality=90)
    return folder


def wait_for_first_commit(driver: subprocess.Popen, out: Path) -> None:
    """Until ``driver`` committed for the first time: its run is under way."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while not (out / "manifest.json").exists():
        assert driver.poll() is None, driver.communicate()
        assert time.monotonic() < deadline, "no commit in time"
        time.sleep(0.02)


def cli_extract(folder: Path, out: Path, address: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cbir_cli.cli", "extract", str(folder), "--out", str(out), "--model", "test_tiny",
         "--engine", "ray", "--ray-address", address, "--batch-size", "2", "--shard-size", "2", "--json"],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@needs_ray
def test_a_driver_killed_mid_run_resumes_to_exactly_the_uninterrupted_result(ray_cluster, tmp_path, tiny_embedder):
    address, env = ray_cluster
    n = 160
    folder = small_images(tmp_path / "images", n)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    out = tmp_path / "out"
    reference = sync_folder(folder, tmp_path / "reference", embedder=tiny_embedder,
                            options=ExtractOptions(workers=0, batch_size=2, shard_size=2))
    assert (reference.store_count, reference.skipped) == (n, 1)

    driver = cli_extract(folder, out, address, env)
    wait_for_first_commit(driver, out)
    driver.send_signal(signal.SIGKILL)
    driver.communicate()
    committed = FeatureStore.open(out).count
    assert 0 < committed < n, committed  # killed mid-run

    resumed = cli_extract(folder, out, address, env)
    stdout, stderr = resumed.communicate(timeout=RUN_TIMEOUT)
    assert resumed.returncode == 0, stderr
    summary = json.loads(stdout)
    # Committed files are never embedded again; nothing is stored twice.
    assert (summary["embedded"], summary["unchanged"], summary["store_count"]) == (n - committed, committed, n)
    # Ray's console noise is off: stderr holds our one warning line (the local
    # engine's reason) and nothing else.
    [(bad_path, reason)] = reference.skipped_files
    assert stderr.splitlines() == [f"warning: skipped {bad_path}: {reason}"], stderr

    a, b = FeatureStore.open(tmp_path / "reference"), FeatureStore.open(out)
    assert [(r.id, r.path) for r in a.live_rows()] == [(r.id, r.path) for r in b.live_rows()]
    assert (a.load_vectors() * b.load_vectors()).sum(axis=1).min() >= 0.999
    assert b.manifest["skipped"] == a.manifest["skipped"]
    assert check_index(out).ok and b.leftover_files() == [] and not (out / "staging").exists()


@needs_ray
def test_sigterm_stops_a_ray_run_with_what_is_done_committed(ray_cluster, tmp_path):
    address, env = ray_cluster
    n = 160
    folder = small_images(tmp_path / "images", n)
    out = tmp_path / "out"
    driver = cli_extract(folder, out, address, env)
    wait_for_first_commit(driver, out)
    driver.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, stderr = driver.communicate(timeout=60)  # the test's guard; it took ~2 s here (README)
    stopped = time.monotonic() - sent
    committed = FeatureStore.open(out).count
    assert driver.returncode == 130 and 0 < committed < n, (driver.returncode, committed, stderr)
    assert stderr.splitlines()[-1] == (f"error: interrupted: {committed} images committed to {out}; "
                                       "run the same command again to resume"), stderr
    assert check_index(out).ok and not (out / "staging").exists()
    print(f"SIGTERM to exit: {stopped:.1f} s")


CRASHING_DRIVER = """
import sys
from cbir_cli.errors import CbirError
from cbir_cli.pipeline.options import ExtractOptions
from cbir_cli.pipeline.ray_executor import RayExecutor, RayOptions
from cbir_cli.pipeline.sync import sync_folder
from tests.fakes import CrashingEmbedder, FakeEmbedder

folder, out, address, crash_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
embedder = CrashingEmbedder(crash_at) if crash_at else FakeEmbedder()
options = ExtractOptions(workers=0, batch_size=4, shard_size=4)
try:
    with RayExecutor(options, RayOptions(address)) as executor:
        summary = sync_folder(folder, out, embedder=embedder, executor=executor, options=options)
    print(summary.embedded)
except CbirError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(1)
"""


@needs_ray
def test_a_worker_killed_mid_run_fails_in_one_line_and_the_rerun_resumes(ray_cluster, image_folder, tmp_path):
    address, env = ray_cluster
    folder = image_folder(24)
    out = tmp_path / "out"

    def run(crash_at: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", CRASHING_DRIVER, str(folder), str(out), address, str(crash_at)],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT)

    # The model actor dies on its third batch: with actor restarts on (Ray Data's
    # default) this would retry the same batch forever; here it fails at once.
    crashed = run(crash_at=3)
    assert crashed.returncode == 1, crashed.stderr
    assert crashed.stderr.startswith("error: a Ray worker was lost (") and len(crashed.stderr.splitlines()) == 1
    assert "running the same command again resumes" in crashed.stderr
    committed = FeatureStore.open(out).count if (out / "manifest.json").exists() else 0
    assert committed in (0, 4, 8)  # at most the two parts written before the crash

    resumed = run(crash_at=0)
    assert resumed.returncode == 0, resumed.stderr
    assert int(resumed.stdout) == 24 - committed
    reference = sync_folder(folder, tmp_path / "reference", embedder=FakeEmbedder(),
                            options=ExtractOptions(workers=0, batch_size=4, shard_size=4))
    assert reference.store_count == FeatureStore.open(out).count == 24
    np.testing.assert_allclose(FeatureStore.open(tmp_path / "reference").load_vectors(),
                               FeatureStore.open(out).load_vectors(), atol=1e-6)


@needs_ray
def test_images_a_node_cannot_reach_stop_the_run_instead_of_being_recorded_as_bad(ray_cluster, tmp_path,
                                                                                  tiny_embedder):
    """On a cluster whose nodes do not all mount the images, every file would fail
    with "file not found" and be remembered as a bad file: that is a setup error."""
    from cbir_cli.pipeline.executor import EmbedRequest
    from cbir_cli.store.transaction import write_transaction

    failures: list[tuple[int, str]] = []
    items = [(f"/no-such-mount/photos/img_{i}.jpg", f"{i:064x}", 1) for i in range(3)]
    with write_transaction(tmp_path / "store") as txn:
        txn.begin(tiny_embedder.fingerprint())
        with ray_executor() as executor, pytest.raises(CbirError, match=r"^/no-such-mount/photos: not found on Ray "
                                                                        r"node .*; the images' folder must be on "
                                                                        r"storage every node mounts"):
            executor.embed(items, EmbedRequest("test_tiny", device="cpu"), txn, lambda i, r: failures.append((i, r)))
        assert failures == [] and txn.store.manifest["skipped"] == {}
    assert not (tmp_path / "store" / "manifest.json").exists()


@needs_ray
def test_a_cuda_request_on_a_cluster_without_gpus_is_one_line(ray_cluster, image_folder, tmp_path, tiny_embedder):
    with ray_executor(device="cuda") as executor, pytest.raises(CbirError, match="the Ray cluster has no GPU"):
        sync_folder(image_folder(2), tmp_path / "out", embedder=tiny_embedder, executor=executor)
    assert not (tmp_path / "out" / "manifest.json").exists()


def _process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, start time, name) of every process, from /proc."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_bytes()
            except OSError:
                continue
            comm, fields = stat[stat.index(b"(") + 1:stat.rindex(b")")], stat.rsplit(b")", 1)[1].split()
            table[int(name)] = (int(fields[1]), int(fields[19]), comm.decode(errors="replace"))
    return table


def _descendants(root: int) -> dict[int, tuple[int, str]]:
    """(start time, name) of every process below ``root``: pid and start time
    together name a process, so a recycled pid is never mistaken for it."""
    table, found, frontier = _process_table(), {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, started, name) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = (started, name)
                frontier.append(pid)
    return found


def _alive(processes: dict[int, tuple[int, str]]) -> dict[int, str]:
    table = _process_table()
    return {pid: name for pid, (started, name) in processes.items() if pid in table and table[pid][1] == started}


@needs_ray
@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process tree from /proc")
def test_a_killed_driver_leaves_none_of_its_private_ray_instance_running(tmp_path):
    """`--ray-address local`, driver SIGKILLed mid-run: every process of the Ray
    instance it started (its agents included) is gone soon after, and nothing
    else was touched (only that run's process tree is looked at)."""
    folder = small_images(tmp_path / "images", 160)
    out = tmp_path / "out"
    driver = cli_extract(folder, out, "local", driver_env())
    ray_processes: dict[int, tuple[int, str]] = {}
    try:
        wait_for_first_commit(driver, out)  # Ray is up, its agents and workers running
        ray_processes = _descendants(driver.pid)
        names = {name for _, name in ray_processes.values()}
        assert {"raylet", "ray::DashboardA", "ray::RuntimeEnv"} <= names, names  # comm is cut at 15 chars
        driver.send_signal(signal.SIGKILL)
        driver.communicate()
        # Ray's own fate-sharing leaves the agents for its ~60 s publish timeout;
        # well under that, everything must be gone.
        deadline = time.monotonic() + 30.0
        while _alive(ray_processes) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _alive(ray_processes) == {}
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.communicate()
        for pid in _alive(ray_processes):  # do not leak them into the next tests
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
