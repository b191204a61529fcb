"""The store's write transaction: one owner of the lock, signals, shard writing,
commits and the interrupt message, for every writer."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from cbir_cli.errors import CbirError, Interrupted
from cbir_cli.store.feature_store import FeatureStore
from cbir_cli.store.transaction import write_transaction

FP = {"model": "synthetic", "weights": "none", "dim": 4, "preprocessing": {}}


def unit_rows(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def items(start: int, n: int) -> list[tuple[str, str, int]]:
    return [(f"/img/{i:03d}.jpg", f"{i:064x}", 1) for i in range(start, start + n)]


def test_shards_commit_as_they_fill_and_the_rest_at_the_end(tmp_path):
    root = tmp_path / "store"
    with write_transaction(root, shard_size=2) as txn:
        txn.begin(FP)
        txn.add(unit_rows(3), items(0, 3))
        assert FeatureStore.open(root).count == 3  # the buffer filled a shard: written and committed at once
        txn.add(unit_rows(1, seed=1), items(3, 1))
        assert FeatureStore.open(root).count == 3  # buffered, not yet committed
    store = FeatureStore.open(root)
    assert store.count == 4 and [r.path for r in store.live_rows()] == [p for p, _, _ in items(0, 4)]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_commit_what_is_done_and_say_how_to_resume(tmp_path, signum):
    root = tmp_path / "store"
    with pytest.raises(Interrupted, match=r"interrupted: 5 vectors committed to .*; run the same command again"):
        with write_transaction(root, shard_size=4, noun="vectors") as txn:
            txn.begin(FP)
            txn.add(unit_rows(5), items(0, 5))  # 4 committed as a shard, 1 buffered
            os.kill(os.getpid(), signum)
    assert FeatureStore.open(root).count == 5
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is the transaction's only


def test_an_interrupted_rebuild_changes_nothing(tmp_path):
    root = tmp_path / "store"
    with write_transaction(root) as txn:
        txn.begin(FP)
        txn.add(unit_rows(3), items(0, 3))
    generation = FeatureStore.open(root).generation
    with pytest.raises(Interrupted, match=r"rebuild .* did not finish and the previous index is unchanged"):
        with write_transaction(root, rebuild=True, shard_size=1) as txn:
            txn.begin(FP)
            txn.add(unit_rows(2, seed=1), items(10, 2))
            raise KeyboardInterrupt
    store = FeatureStore.open(root)
    assert store.generation == generation and [r.path for r in store.live_rows()] == [p for p, _, _ in items(0, 3)]


def test_one_writer_at_a_time(tmp_path):
    root = tmp_path / "store"
    with write_transaction(root) as txn:
        txn.begin(FP)
        with pytest.raises(CbirError, match="another cbir process is writing this index"):
            with write_transaction(root):
                pass


def test_a_transaction_that_stores_nothing_leaves_nothing(tmp_path):
    root = tmp_path / "deep" / "store"
    with write_transaction(root) as txn:
        txn.begin(FP)
    assert not root.exists()  # no manifest pinning a model, no folder holding only .lock
    with pytest.raises(RuntimeError), write_transaction(root) as txn:
        txn.begin(FP)
        raise RuntimeError("the model failed to load")
    assert not root.exists()
