"""Crash safety: SIGKILL and Ctrl-C the indexer at random points, resume, and the
store must converge to exactly what an uninterrupted run makes; a query during
indexing sees the last commit; a second indexer is refused.

The indexer runs in a child *forked* from the test process (the tiny model is
already loaded there), so a kill costs a fraction of a second, not an interpreter
start. Torch's OpenMP pool does not survive fork, so the child uses one thread.
"""

from __future__ import annotations

import hashlib
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image
from typer.testing import CliRunner

from cbir_cli.cli import app
from cbir_cli.errors import CbirError, IndexNotFoundError, Interrupted
from cbir_cli.pipeline.options import ExtractOptions
from cbir_cli.pipeline.sync import sync_folder
from cbir_cli.search.check import check_index
from cbir_cli.search.searcher import Searcher
from cbir_cli.store.feature_store import FeatureStore

# Tiny commits, so a random kill lands anywhere: between shards, inside a shard
# write, inside the manifest rename, during planning.
OPTIONS = ExtractOptions(workers=0, batch_size=2, shard_size=2)
N_IMAGES = 24
EXIT_INTERRUPTED = 130


def write_images(folder: Path, seeds: range | list[int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        make_image(seed).save(folder / f"img_{seed:03d}.jpg", quality=90)


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fork_indexer(folder: Path, store_dir: Path, embedder) -> int:
    """Start ``sync_folder`` in a forked child; returns its pid. Exit status 0 when it
    finished, 130 on Ctrl-C (the library's Interrupted), 1 on anything else."""
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            import torch

            torch.set_num_threads(1)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            sync_folder(folder, store_dir, embedder=embedder, options=OPTIONS)
            code = 0
        except Interrupted as exc:
            message_fd = getattr(embedder, "message_fd", None)
            if message_fd is not None:
                os.write(message_fd, str(exc).encode())
            code = EXIT_INTERRUPTED
        finally:
            os._exit(code)
    return pid


def wait_child(pid: int, timeout: float = 60.0) -> int:
    """Wait for a child (killing it if it hangs); returns os.waitpid's status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"indexer child {pid} hung for {timeout}s")


@dataclass
class Reference:
    """What an uninterrupted run stores: file name -> vector (trials run in other
    folders), plus every vector by content."""

    by_name: dict[str, np.ndarray]
    by_sha: dict[str, np.ndarray]


def reference_run(folder: Path, store_dir: Path, embedder) -> Reference:
    sync_folder(folder, store_dir, embedder=embedder, options=OPTIONS)
    store = FeatureStore.open(store_dir)
    rows, vectors = store.live_rows(), store.load_vectors()
    return Reference({Path(r.path).name: v for r, v in zip(rows, vectors)},
                     {r.sha256: v for r, v in zip(rows, vectors)})


def clone_store(source: Path, target: Path, folder: Path) -> None:
    """Copy a store as if it had been built from ``folder`` (rows re-keyed to it):
    the starting point of an incremental update, without embedding again."""
    store = FeatureStore.open(source)
    rows = store.live_rows()
    clone = FeatureStore.create(target, store.fingerprint)
    clone.add_shard(store.load_vectors(), [(str(folder / Path(r.path).name), r.sha256, r.size) for r in rows])
    clone.commit()


class KillLog:
    """Invariants of the committed state after every kill, and across kills:
    an id, once committed, always names the same (path, content)."""

    def __init__(self, by_sha: dict[str, np.ndarray]) -> None:
        self.by_sha = by_sha
        self.identity: dict[int, tuple[str, str]] = {}
        self.kills = 0

    def check(self, store_dir: Path) -> None:
        if not FeatureStore.exists(store_dir):  # killed before the first commit
            return
        store = FeatureStore.open(store_dir)
        rows, vectors = store.live_rows(), store.load_vectors()
        assert store.count == len(rows) == len(vectors)
        assert len({r.path for r in rows}) == len(rows), "a path is stored twice"
        assert len({r.id for r in rows}) == len(rows), "an id is stored twice"
        for row, vector in zip(rows, vectors):
            assert self.identity.setdefault(row.id, (row.path, row.sha256)) == (row.path, row.sha256)
            np.testing.assert_allclose(vector, self.by_sha[row.sha256], atol=1e-5)
        report = check_index(store_dir)
        assert report.ok, report.problems


def assert_same_as_reference(store_dir: Path, folder: Path, reference: Reference) -> None:
    store = FeatureStore.open(store_dir)
    rows, vectors = store.live_rows(), store.load_vectors()
    assert sorted(r.path for r in rows) == sorted(str(folder / name) for name in reference.by_name)
    for row, vector in zip(rows, vectors):
        assert row.sha256 == file_sha(Path(row.path)), f"{row.path}: id {row.id} holds another content"
        np.testing.assert_allclose(vector, reference.by_name[Path(row.path).name], atol=1e-5)
    assert store.leftover_files() == []
    assert check_index(store_dir).ok


def kill_until_done(folder: Path, store_dir: Path, embedder, rng: random.Random, horizon: float,
                    log: KillLog, max_kills: int) -> None:
    """SIGKILL the indexer after random delays until a run finishes on its own (or
    ``max_kills`` is reached; then one last uninterrupted resume)."""
    for _ in range(max_kills):
        pid = fork_indexer(folder, store_dir, embedder)
        # A resumed run has less left to do; a shorter window keeps most runs killed.
        time.sleep(rng.uniform(0.0, 0.7 * horizon))
        os.kill(pid, signal.SIGKILL)
        status = wait_child(pid)
        if not os.WIFSIGNALED(status):
            assert os.WEXITSTATUS(status) == 0
            return
        log.kills += 1
        log.check(store_dir)
    sync_folder(folder, store_dir, embedder=embedder, options=OPTIONS)


@dataclass
class Scenario:
    folder_a: Path  # first state of the folder
    store_a: Path  # its uninterrupted index
    ref_a: Reference
    ref_b: Reference  # the folder after mutate(), indexed uninterrupted
    horizons: tuple[float, float]  # seconds an uninterrupted child run takes: fresh, update


def mutate(folder: Path) -> None:
    """Add 3 images, change 3 (same name, new content), delete 3, rename 3."""
    write_images(folder, [100, 101, 102])
    for i, seed in zip((0, 1, 2), (200, 201, 202)):
        make_image(seed).save(folder / f"img_{i:03d}.jpg", quality=90)
    for i in (3, 4, 5):
        (folder / f"img_{i:03d}.jpg").unlink()
    for i in (6, 7, 8):
        (folder / f"img_{i:03d}.jpg").rename(folder / f"moved_{i:03d}.jpg")


@pytest.fixture(scope="module", autouse=True)
def no_fsync():
    """fsync makes writes survive power loss; a killed *process* loses nothing the
    kernel already has, so what these tests prove (write order, atomic renames,
    manifest as commit point) holds without it, and hundreds of commits run in a
    fraction of the time. test_incremental.py runs with real fsyncs."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "fsync", lambda fd: None)
        yield


@pytest.fixture(scope="module")
def scenario(tiny_embedder, tmp_path_factory) -> Scenario:
    base = tmp_path_factory.mktemp("crash")
    folder_a = base / "a"
    write_images(folder_a, range(N_IMAGES))
    ref_a = reference_run(folder_a, base / "store_a", tiny_embedder)  # also warms up torchvision's import
    folder_b = base / "b"
    shutil.copytree(folder_a, folder_b)
    mutate(folder_b)
    ref_b = reference_run(folder_b, base / "store_b", tiny_embedder)
    clone_store(base / "store_a", base / "timing_update", folder_b)  # as if B's folder had held A
    horizons = []
    for store_dir in (base / "timing_fresh", base / "timing_update"):
        started = time.perf_counter()
        assert os.WEXITSTATUS(wait_child(fork_indexer(folder_b, store_dir, tiny_embedder))) == 0
        horizons.append(time.perf_counter() - started)
    return Scenario(folder_a, base / "store_a", ref_a, ref_b, (horizons[0], horizons[1]))


def run_kill_trials(scenario: Scenario, embedder, work: Path, seed: int, kills_wanted: int) -> int:
    """Alternate fresh indexing and incremental updates (A -> B), each killed at
    random points until done; check invariants after every kill and the final
    store against the uninterrupted reference."""
    rng = random.Random(seed)
    by_sha = {**scenario.ref_a.by_sha, **scenario.ref_b.by_sha}
    total = 0
    trial = 0
    while total < kills_wanted:
        trial_dir = work / f"trial{trial}"
        folder, store_dir = trial_dir / "photos", trial_dir / "store"
        shutil.copytree(scenario.folder_a, folder)
        reference, horizon = scenario.ref_a, scenario.horizons[0]
        if trial % 2:
            clone_store(scenario.store_a, store_dir, folder)
            mutate(folder)
            reference, horizon = scenario.ref_b, scenario.horizons[1]
        log = KillLog(by_sha)
        kill_until_done(folder, store_dir, embedder, rng, horizon, log, max_kills=10)
        assert_same_as_reference(store_dir, folder, reference)
        total += log.kills
        trial += 1
        shutil.rmtree(trial_dir)
    return total


def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_result(scenario, tiny_embedder, tmp_path):
    kills = run_kill_trials(scenario, tiny_embedder, tmp_path, seed=6, kills_wanted=50)
    assert kills >= 50


@pytest.mark.slow
def test_sigkill_stress(scenario, tiny_embedder, tmp_path, request):
    markexpr = request.config.option.markexpr or ""
    if "slow" not in markexpr or "not slow" in markexpr:
        pytest.skip("300-kill stress test (about a minute): run it with `pytest -m slow`")
    kills = run_kill_trials(scenario, tiny_embedder, tmp_path, seed=1066, kills_wanted=300)
    assert kills >= 300


class PausingEmbedder:
    """Wraps the tiny model; on its ``pause_at``-th batch it tells the parent (pipe)
    and then sleeps (Ctrl-C lands there) or waits for the parent's go-ahead."""

    def __init__(self, inner, pause_at: int, wait_for_parent: bool) -> None:
        self.inner = inner
        self.pause_at = pause_at
        self.calls = 0
        self.ready_r, self.ready_w = os.pipe()
        self.go_r, self.go_w = os.pipe()
        self.message_r, self.message_fd = os.pipe()
        self.wait_for_parent = wait_for_parent

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def embed(self, batch):
        self.calls += 1
        if self.calls == self.pause_at:
            os.write(self.ready_w, b"1")
            if self.wait_for_parent:
                os.read(self.go_r, 1)
            else:
                time.sleep(60)
        return self.inner.embed(batch)

    def wait_until_paused(self, pid: int, timeout: float = 30.0) -> None:
        readable, _, _ = select.select([self.ready_r], [], [], timeout)
        if not readable:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("the indexer never reached its pause point")
        os.read(self.ready_r, 1)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_commits_what_is_done_and_says_how_to_resume(signum, scenario, tiny_embedder, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(scenario.folder_a, folder)
    store_dir = tmp_path / "store"
    embedder = PausingEmbedder(tiny_embedder, pause_at=5, wait_for_parent=False)
    pid = fork_indexer(folder, store_dir, embedder)
    embedder.wait_until_paused(pid)
    os.kill(pid, signum)
    status = wait_child(pid)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_INTERRUPTED
    message = os.read(embedder.message_r, 4096).decode()
    # 4 batches of 2 were embedded and committed before the pause.
    assert message == f"interrupted: 8 images committed to {store_dir}; run the same command again to resume"
    store = FeatureStore.open(store_dir)
    assert store.count == 8 and check_index(store_dir).ok

    summary = sync_folder(folder, store_dir, embedder=tiny_embedder, options=OPTIONS)
    assert (summary.unchanged, summary.added, summary.embedded) == (8, N_IMAGES - 8, N_IMAGES - 8)
    assert_same_as_reference(store_dir, folder, scenario.ref_a)


def test_query_during_indexing_sees_the_last_commit_and_a_second_indexer_is_refused(
    scenario, tiny_embedder, tmp_path
):
    folder = tmp_path / "photos"
    shutil.copytree(scenario.folder_a, folder)
    store_dir = tmp_path / "store"
    embedder = PausingEmbedder(tiny_embedder, pause_at=4, wait_for_parent=True)
    pid = fork_indexer(folder, store_dir, embedder)
    try:
        embedder.wait_until_paused(pid)
        # Three batches of two were embedded; the fourth is in the model. The model
        # runs in its own thread, so the third may reach the store just after the
        # fourth started: wait for that commit (nothing else can come while paused).
        # The store is new: until the writer thread's first commit there is no
        # manifest at all (seen once in a full run: IndexNotFoundError here).
        deadline = time.monotonic() + 30
        while committed_count(store_dir) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        searcher = Searcher.open(store_dir, embedder=tiny_embedder)
        committed = FeatureStore.open(store_dir).live_rows()
        assert searcher.count == len(committed) == 6
        assert [r.path for r in searcher.rows] == [r.path for r in committed]
        # It serves the committed vectors: each stored image finds itself first.
        for row in committed:
            hit = searcher.search_vectors(scenario.ref_a.by_sha[row.sha256], k=1)[0][0]
            assert (hit.id, hit.path) == (row.id, row.path) and hit.score == pytest.approx(1.0, abs=1e-5)

        with pytest.raises(CbirError, match="another cbir process is writing this index"):
            sync_folder(folder, store_dir, embedder=tiny_embedder, options=OPTIONS)
        result = CliRunner().invoke(app, ["index", str(folder), "--index", str(store_dir), "--model", "test_tiny",
                                          "--workers", "0"])
        assert result.exit_code == 1
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and "another cbir process is writing this index" in lines[0]
        assert lines[0].startswith("error:")
        assert FeatureStore.open(store_dir).count == 6  # the refused runs changed nothing
    finally:
        os.write(embedder.go_w, b"1")
        status = wait_child(pid)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert Searcher.open(store_dir, embedder=tiny_embedder).count == N_IMAGES


def committed_count(store_dir: Path) -> int:
    """Images committed so far; 0 before a new store's first commit."""
    try:
        return FeatureStore.open(store_dir).count
    except IndexNotFoundError:
        return 0


def test_a_decoding_worker_exits_when_its_parent_is_killed(tmp_path):
    """The decoding workers' init (imageio.readers' pool initializer) ties their life
    to the parent's: SIGKILL the parent, the worker goes too (issue 10, item 6)."""
    import textwrap

    script = tmp_path / "parent.py"
    pid_file = tmp_path / "worker.pid"
    script.write_text(textwrap.dedent(f"""
        import multiprocessing, os, sys, time
        from cbir_cli.imageio.readers import _init_worker

        def worker():
            _init_worker(None)
            open({str(pid_file)!r}, "w").write(str(os.getpid()))
            time.sleep(300)

        if __name__ == "__main__":
            multiprocessing.set_start_method("fork")
            multiprocessing.Process(target=worker).start()
            time.sleep(300)
    """))
    parent = subprocess.Popen([sys.executable, str(script)])
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline, "worker did not start"
            time.sleep(0.05)
        worker = int(pid_file.read_text())
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 30
        while Path(f"/proc/{worker}").exists() and "zombie" not in _state(worker):
            if time.monotonic() > deadline:
                os.kill(worker, signal.SIGKILL)
                pytest.fail("the worker outlived its killed parent")
            time.sleep(0.1)
    finally:
        parent.kill()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"
