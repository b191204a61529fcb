"""float16 shards (store/shard_format.py): half the disk, read back as float32, the
same top-k as a float32 store, one dtype per store (changing it needs a rebuild),
and the same integrity guarantees (checksums, repair, recovery) as float32 shards."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cbir_cli.cli import app
from cbir_cli.errors import CorruptStoreError, StoreMismatchError
from cbir_cli.fsutil import bytes_sha256, npy_bytes
from cbir_cli.pipeline.local import LocalExecutor
from cbir_cli.pipeline.options import ExtractOptions
from cbir_cli.pipeline.sync import sync_folder
from cbir_cli.search.faiss_backend import FaissBackend
from cbir_cli.store.adoption import adopt_part
from cbir_cli.store.feature_store import FeatureStore
from cbir_cli.store.integrity import shard_problems
from cbir_cli.store.repair import drop_damaged_shards, recover_manifest
from cbir_cli.store.staging import write_part
from cbir_cli.store.vectors import ShardVectors
from tests.fakes import FakeBackend, FakeEmbedder

FLOAT16_STEP = 2.0 ** -11  # float16's relative rounding error: |x| <= 1 in a unit vector


def fake_store(folder: Path, target: Path, shard_dtype: str | None, rebuild: bool = False) -> FeatureStore:
    """``folder`` synced into ``target`` by the fake embedder, in shards of 7 rows."""
    options = ExtractOptions(workers=0, batch_size=7, shard_size=7, shard_dtype=shard_dtype)
    sync_folder(folder, target, embedder=FakeEmbedder(), options=options, executor=LocalExecutor(options),
                rebuild=rebuild)
    return FeatureStore.open(target)


def shard_headers(store: FeatureStore) -> set[str]:
    return {str(np.load(store.shard_paths(s)[0], mmap_mode="r").dtype) for s in store.manifest["shards"]}


@pytest.fixture
def twin_stores(image_folder, tmp_path):
    """The same 30 images in a float32 store and a float16 store."""
    folder = image_folder(30)
    return fake_store(folder, tmp_path / "f32", None), fake_store(folder, tmp_path / "f16", "float16")


def test_float16_store_reads_back_float32_rows_within_float16_precision_on_half_the_disk(twin_stores):
    f32, f16 = twin_stores
    assert f32.shard_dtype == "float32" and f16.shard_dtype == "float16"
    assert json.loads((f16.root / "manifest.json").read_text())["shard_dtype"] == "float16"
    assert json.loads((f16.root / "store.json").read_text())["shard_dtype"] == "float16"
    assert f16.fingerprint == f32.fingerprint  # same model's vectors: the fingerprint says nothing of the dtype
    assert shard_headers(f32) == {"float32"} and shard_headers(f16) == {"float16"}
    assert [r.path for r in f16.live_rows()] == [r.path for r in f32.live_rows()]

    exact, half = f32.load_vectors(), f16.load_vectors()
    assert half.dtype == np.float32 and half.shape == exact.shape == (30, 48)
    assert 0 < np.abs(half - exact).max() <= FLOAT16_STEP  # rounded, not copied
    np.testing.assert_array_equal(half, exact.astype(np.float16).astype(np.float32))
    # Every reader gets the same float32 rows: row reads (mapped and verified) and integrity.
    positions = np.array([29, 3, 4, 17, 0])
    for streamed in (ShardVectors(f16), ShardVectors(f16, verified=True)):
        got = streamed[positions]
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, half[positions])
    full_read = f16.read_shard(f16.manifest["shards"][0], mmap=False)
    assert full_read.dtype == np.float32 and full_read.shape == (7, 48)
    problems: list[str] = []
    checked = shard_problems(f16, problems)
    assert problems == [] and checked.dtype == np.float32
    np.testing.assert_array_equal(checked, half)

    def shard_bytes(store: FeatureStore) -> int:
        return sum(s["bytes"] for s in store.manifest["shards"])

    # The vectors take half the bytes; only the .npy header (128 bytes a shard) is not halved.
    header = 128 * len(f16.manifest["shards"])
    assert shard_bytes(f16) - header == (shard_bytes(f32) - header) // 2


def test_search_on_a_float16_store_returns_the_exact_float32_top_k(twin_stores):
    f32, f16 = twin_stores
    oracle = FakeBackend()  # exact search over the float32 vectors
    oracle.build(f32, "flat")
    queries = f32.load_vectors()
    truth_scores, truth = oracle.search(queries, 10)
    flat = FaissBackend()
    flat.build(f16, "flat", persist=False)
    scores, ids = flat.search(queries, 10)
    np.testing.assert_array_equal(ids, truth)
    np.testing.assert_allclose(scores, truth_scores, atol=2 * FLOAT16_STEP)


def test_compressed_index_over_float16_shards_reranks_with_float16_rows(tmp_path):
    """IVF-PQ re-ranks its shortlist with exact rows read (memory-mapped) from the
    shards: those must be the float16 rows converted, and agree with a float32 store."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1200, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    stores = {}
    for dtype in ("float32", "float16"):
        store = FeatureStore.create(tmp_path / dtype, {"model": "synthetic", "weights": "none", "dim": 32,
                                                       "preprocessing": {}}, shard_dtype=dtype)
        for start in range(0, len(x), 500):
            store.add_shard(x[start:start + 500], [(f"/img/{i}.jpg", f"{i:064x}", 1)
                                                   for i in range(start, min(len(x), start + 500))])
        store.commit()
        stores[dtype] = store
    backends = {}
    for dtype, store in stores.items():
        backends[dtype] = FaissBackend()
        backends[dtype].build(store, "ivfpq", persist=False)
    ids = np.arange(0, 1200, 37)
    got = backends["float16"].vectors(ids)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, x[ids].astype(np.float16).astype(np.float32))
    s16, i16 = backends["float16"].search(x[:50], 5)
    s32, i32 = backends["float32"].search(x[:50], 5)
    assert (i16[:, 0] == np.arange(50)).all() and (i32[:, 0] == np.arange(50)).all()
    np.testing.assert_allclose(s16, s32, atol=2 * FLOAT16_STEP)


def test_a_store_keeps_its_dtype_and_refuses_another_without_a_rebuild(image_folder, tmp_path):
    folder = image_folder(10)
    store = fake_store(folder, tmp_path / "s", None)
    before = (store.root / "manifest.json").read_bytes()
    with pytest.raises(StoreMismatchError, match=r"its shards are float32.*float16 shards need a rebuild") as err:
        fake_store(folder, store.root, "float16")
    assert err.value.remedy == "shard-dtype"
    assert (store.root / "manifest.json").read_bytes() == before  # nothing written

    # A rebuild switches; later runs that name no dtype keep the store's (new shards too).
    rebuilt = fake_store(folder, store.root, "float16", rebuild=True)
    assert rebuilt.shard_dtype == "float16" and shard_headers(rebuilt) == {"float16"} and rebuilt.count == 10
    image_folder(14)  # four more images in the same folder
    grown = fake_store(folder, store.root, None)
    assert grown.count == 14 and grown.shard_dtype == "float16" and shard_headers(grown) == {"float16"}
    with pytest.raises(StoreMismatchError):
        fake_store(folder, store.root, "float32")
    # ... and back, by a rebuild.
    back = fake_store(folder, store.root, "float32", rebuild=True)
    assert back.shard_dtype == "float32" and shard_headers(back) == {"float32"} and back.count == 14


def test_a_store_made_before_shard_dtypes_existed_opens_as_float32(image_folder, tmp_path):
    store = fake_store(image_folder(6), tmp_path / "s", None)
    manifest = json.loads((store.root / "manifest.json").read_text())
    del manifest["shard_dtype"]
    (store.root / "manifest.json").write_text(json.dumps(manifest))
    old = FeatureStore.open(store.root)
    assert old.shard_dtype == "float32"
    np.testing.assert_array_equal(old.load_vectors(), store.load_vectors())
    manifest["shard_dtype"] = "bfloat16"
    (store.root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptStoreError, match="shard dtype 'bfloat16' is not one of float32, float16"):
        FeatureStore.open(store.root)


def test_a_damaged_float16_shard_is_detected_dropped_and_recovered_around(image_folder, tmp_path):
    store = fake_store(image_folder(20), tmp_path / "s", "float16")
    before = dict(zip([r.path for r in store.live_rows()], store.load_vectors()))
    shard = store.manifest["shards"][1]
    path = store.shard_paths(shard)[0]
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # one bit of one float16 in the last row
    path.write_bytes(bytes(data))

    fresh = FeatureStore.open(store.root)
    with pytest.raises(CorruptStoreError, match="checksum mismatch"):
        fresh.load_vectors()
    with pytest.raises(CorruptStoreError, match="checksum mismatch"):
        ShardVectors(fresh, verified=True)
    problems: list[str] = []
    assert shard_problems(fresh, problems) is None and "checksum mismatch" in problems[0]
    notes = drop_damaged_shards(fresh)
    assert len(notes) == 1 and str(path) in notes[0]
    assert shard["name"] not in {s["name"] for s in fresh.manifest["shards"]}

    # The next run re-embeds that shard's images, in float16.
    healed = fake_store(tmp_path / "images", store.root, None)
    assert healed.count == 20 and shard_headers(healed) == {"float16"}
    after = dict(zip([r.path for r in healed.live_rows()], healed.load_vectors()))
    assert after.keys() == before.keys()
    np.testing.assert_array_equal(np.array([after[p] for p in before]), np.array(list(before.values())))


def test_a_float32_file_in_a_float16_store_is_refused_even_with_a_matching_checksum(image_folder, tmp_path):
    """The header's dtype is checked against the manifest, as the shape is."""
    store = fake_store(image_folder(8), tmp_path / "s", "float16")
    shard = store.manifest["shards"][0]
    path = store.shard_paths(shard)[0]
    data = npy_bytes(np.load(path), "float32")
    path.write_bytes(data)
    store.manifest["shards"][0] = {**shard, "sha256": bytes_sha256(data), "bytes": len(data)}
    with pytest.raises(CorruptStoreError, match=r"\(7, 48\) float32, manifest says \(7, 48\) float16"):
        store.read_shard(store.manifest["shards"][0], mmap=False)
    with pytest.raises(CorruptStoreError, match="manifest says"):
        ShardVectors(store)[np.arange(3)]  # checked when the shard is first read


def test_a_lost_manifest_of_a_float16_store_is_recovered_as_float16(image_folder, tmp_path):
    store = fake_store(image_folder(15), tmp_path / "s", "float16")
    vectors = store.load_vectors()
    (store.root / "manifest.json").unlink()
    recovery = recover_manifest(store.root, generation=store.generation + 1)
    assert recovery.images == 15 and recovery.dropped == []
    recovered = FeatureStore.open(store.root)
    assert recovered.shard_dtype == "float16"
    np.testing.assert_array_equal(recovered.load_vectors(), vectors)


def test_worker_parts_are_written_and_adopted_in_the_store_dtype(tmp_path):
    store = FeatureStore.create(tmp_path / "s", {"model": "synthetic", "weights": "none", "dim": 4,
                                                 "preprocessing": {}}, shard_dtype="float16")
    run = tmp_path / "s" / "staging" / "run-1"
    run.mkdir(parents=True)
    x = np.eye(4, dtype=np.float32)
    wrong = write_part(run, x[:2], [("/a.jpg", "a" * 64, 1), ("/b.jpg", "b" * 64, 1)])  # float32, the default
    with pytest.raises(CorruptStoreError, match=r"float32, its items file says .* float16"):
        adopt_part(store, run, wrong)
    right = write_part(run, x[2:], [("/c.jpg", "c" * 64, 1), ("/d.jpg", "d" * 64, 1)], store.shard_dtype)
    adopt_part(store, run, right)
    store.commit()
    assert shard_headers(store) == {"float16"}
    np.testing.assert_array_equal(FeatureStore.open(store.root).load_vectors(), x[2:])


def test_cli_index_with_shard_dtype_float16_end_to_end(image_folder, index_env):
    runner = CliRunner()
    folder = image_folder(10)
    base = ["index", str(folder), "--model", "test_tiny", "--workers", "0"]
    result = runner.invoke(app, [*base, "--shard-dtype", "float16", "--json"])
    assert result.exit_code == 0, result.output
    store = FeatureStore.open(index_env)
    assert store.shard_dtype == "float16" and shard_headers(store) == {"float16"} and store.count == 10

    check = runner.invoke(app, ["check"])
    assert check.exit_code == 0 and "10 images in 1 float16 shards" in check.output, check.output
    query = runner.invoke(app, ["query", str(folder / "img_003.jpg"), "-k", "1", "--json"])
    assert query.exit_code == 0, query.output
    assert "img_003.jpg" in query.stdout

    refused = runner.invoke(app, [*base, "--shard-dtype", "float32"])
    assert refused.exit_code == 1
    lines = [line for line in refused.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "its shards are float16" in lines[0] and "--rebuild" in lines[0], refused.output
    assert "Traceback" not in refused.output

    switched = runner.invoke(app, [*base, "--rebuild", "--shard-dtype", "float32", "--json"])
    assert switched.exit_code == 0, switched.output
    assert shard_headers(FeatureStore.open(index_env)) == {"float32"}


class SlowFakeEmbedder(FakeEmbedder):
    """The fake with a few ms per batch, so a random kill lands mid-run."""

    def embed(self, batch):
        time.sleep(0.003)
        return super().embed(batch)


def run_killed(folder: Path, target: Path, rng: random.Random, horizon: float, rebuild: bool,
               after_kill) -> int:
    """Index ``folder`` into ``target`` as float16 in a forked child, SIGKILLed at
    random points until a run finishes (at most 8 kills, then one plain run);
    ``after_kill(target)`` checks the committed state after each kill."""
    options = ExtractOptions(workers=0, batch_size=2, shard_size=2, shard_dtype="float16")
    kills = 0
    for _ in range(8):
        pid = os.fork()
        if pid == 0:  # child: never return into pytest
            code = 1
            try:
                sync_folder(folder, target, embedder=SlowFakeEmbedder(), options=options, rebuild=rebuild)
                code = 0
            finally:
                os._exit(code)
        time.sleep(rng.uniform(0.0, 0.8 * horizon))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        if not os.WIFSIGNALED(status):
            assert os.WEXITSTATUS(status) == 0
            return kills
        kills += 1
        after_kill(target)
    sync_folder(folder, target, embedder=SlowFakeEmbedder(), options=options, rebuild=rebuild)
    return kills


def test_sigkill_while_writing_float16_shards_or_rebuilding_into_them_loses_nothing(image_folder, tmp_path):
    folder = image_folder(24)
    started = time.perf_counter()
    reference = fake_store(folder, tmp_path / "ref16", "float16")
    horizon = max(0.05, time.perf_counter() - started + 24 * 0.003)
    want16 = dict(zip([r.path for r in reference.live_rows()], reference.load_vectors()))
    rng = random.Random(16)

    def consistent(store: FeatureStore, want: dict[str, np.ndarray]) -> None:
        problems: list[str] = []
        vectors = shard_problems(store, problems)
        assert problems == [], problems  # leftovers of the killed write may remain: never read
        for row, vector in zip(store.live_rows(), vectors):
            np.testing.assert_array_equal(vector, want[row.path])

    def fresh_prefix(target: Path) -> None:  # a fresh float16 index: a committed prefix
        if FeatureStore.exists(target):
            store = FeatureStore.open(target)
            assert store.shard_dtype == "float16"
            consistent(store, want16)

    kills = run_killed(folder, tmp_path / "fresh", rng, horizon, rebuild=False, after_kill=fresh_prefix)
    done = FeatureStore.open(tmp_path / "fresh")
    assert done.count == 24 and done.shard_dtype == "float16" and shard_headers(done) == {"float16"}
    consistent(done, want16)

    # A float32 index rebuilt into float16 shards: until the rebuild's one commit,
    # readers see the complete float32 index; after it, the complete float16 one.
    old = fake_store(folder, tmp_path / "rebuilt", None)
    want32 = dict(zip([r.path for r in old.live_rows()], old.load_vectors()))

    def old_or_new(target: Path) -> None:
        store = FeatureStore.open(target)
        assert store.count == 24
        consistent(store, want32 if store.shard_dtype == "float32" else want16)

    kills += run_killed(folder, tmp_path / "rebuilt", rng, horizon, rebuild=True, after_kill=old_or_new)
    rebuilt = FeatureStore.open(tmp_path / "rebuilt")
    assert rebuilt.shard_dtype == "float16" and shard_headers(rebuilt) == {"float16"}
    consistent(rebuilt, want16)
    assert kills >= 4, kills  # the kills did land mid-run
