#!/usr/bin/env python3
"""float32 against float16 shards (``cbir index --shard-dtype float16``) on real
images and the real model: does retrieval change, and what does it save on disk?

    CBIR_SHARED=/work/shared python -m bench.shard_dtype
    python -m bench.shard_dtype --datasets /path/to/oxford17flowers --model mobilenet_v2 --precision fp32

Per dataset (folder layout: one sub-folder per class) the images are embedded once,
by ``index_folder`` into a float32 index (what ``cbir index`` makes); the float16
index gets the same vectors through the store's write transaction (``add_shard``
rounds them to float16 exactly as ``cbir index --shard-dtype float16`` does with the
model's output), and its search index is made the way ``cbir index`` makes it. Both
stores are then read back through the store (float32 rows) and evaluated with the
library's evaluation: all-vs-all exact search (``rank_all_vs_all``, the Faiss flat
oracle) and ``score_rankings`` (mAP, R@1, MAP@R, and N-S where every class has 4
images). Also printed: how many of each query's top-10 agree (as a set, and in
order), the largest |cosine difference| over all pairs and between an image's two
vectors, and the bytes of the shards and of the whole index folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py`: see bench/harness.py
from bench.harness import SHARED, write_result

DEFAULT_DATASETS = ("oxford17flowers", "ukbench_mini")
TOP = 10


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default=",".join(str(SHARED / name) for name in DEFAULT_DATASETS),
                   help="comma list of dataset folders (one sub-folder per class)")
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--precision", default="auto", help="auto (int8 for mobilenet_v2 on the CPU) | fp32 | int8")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: cores - 1)")
    p.add_argument("--work", type=Path, default=None, help="where the two indexes go (default: a temp folder)")
    return p.parse_args()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def float16_twin(source: Path, target: Path):
    """A float16 index holding ``source``'s rows and vectors, its search index
    brought up to date as ``cbir index`` does after a commit."""
    from cbir_cli.search.backends import refresh_backend
    from cbir_cli.store.feature_store import FeatureStore
    from cbir_cli.store.transaction import write_transaction

    store32 = FeatureStore.open(source)
    rows = store32.live_rows()
    with write_transaction(target, shard_dtype="float16") as txn:
        store = txn.begin(store32.fingerprint)
        txn.add(store32.load_vectors(), [(r.path, r.sha256, r.size) for r in rows])
        txn.commit()
    refresh_backend(store, None)
    return store


def vectors_in_order(store, paths: list[str]):
    """The store's float32 vectors in ``paths`` order (the collection's)."""
    import numpy as np

    from cbir_cli.store.vectors import ShardVectors

    row_of = {os.path.realpath(r.path): i for i, r in enumerate(store.live_rows())}
    positions = np.array([row_of[os.path.realpath(p)] for p in paths], dtype=np.int64)
    whole, streamed = store.load_vectors()[positions], ShardVectors(store, verified=True)[positions]
    assert whole.dtype == streamed.dtype == np.float32 and np.array_equal(whole, streamed)
    return whole


def compare(dataset: Path, work: Path, args: argparse.Namespace) -> list[tuple[str, str, str]]:
    import numpy as np

    from cbir_cli.evaluate.compare import ranking_backend
    from cbir_cli.evaluate.datasets import load_collection
    from cbir_cli.evaluate.run import EvaluationOptions, default_depth, rank_all_vs_all, score_rankings
    from cbir_cli.pipeline.options import ExtractOptions, default_workers
    from cbir_cli.pipeline.sync import index_folder
    from cbir_cli.store.feature_store import FeatureStore

    collection = load_collection("folder", dataset)
    options = ExtractOptions(workers=default_workers() if args.workers is None else args.workers,
                             precision=args.precision)
    started = time.perf_counter()
    index_folder(dataset, work / "float32", model=args.model, options=options)
    embedded = time.perf_counter() - started
    stores = {"float32": FeatureStore.open(work / "float32"), "float16": float16_twin(work / "float32",
                                                                                     work / "float16")}
    labels = collection.labels
    evaluation = EvaluationOptions()
    depth = default_depth(len(labels), int(np.unique(labels, return_counts=True)[1].max()) - 1, evaluation)
    product = evaluation.variants()[0]  # cbir evaluate's default ranking: alpha-QE + DBA re-ranking
    vectors, ranked, metrics, reranked = {}, {}, {}, {}
    for dtype, store in stores.items():
        vectors[dtype] = vectors_in_order(store, collection.paths)
        ranked[dtype] = rank_all_vs_all(vectors[dtype], depth)
        metrics[dtype] = score_rankings(labels, ranked[dtype], evaluation)
        reranked[dtype] = score_rankings(labels, rank_all_vs_all(vectors[dtype], depth, ranking_backend(product)),
                                         evaluation)
    v32, v16 = (vectors[d].astype(np.float64) for d in ("float32", "float16"))
    pair_diff = float(np.abs(v32 @ v32.T - v16 @ v16.T).max())
    self_diff = float(np.abs(1.0 - np.einsum("nd,nd->n", v32, v16)).max())
    top32, top16 = ranked["float32"][:, :TOP], ranked["float16"][:, :TOP]
    as_set = float(np.mean([len(set(a) & set(b)) / TOP for a, b in zip(top32, top16)]))
    in_order = float(np.mean((top32 == top16).all(axis=1)))
    whole = float(np.mean((ranked["float32"] == ranked["float16"]).all(axis=1)))
    fingerprint = stores["float32"].fingerprint
    print(f"{dataset.name}: {len(labels)} images, {len(np.unique(labels))} classes, {args.model} "
          f"{fingerprint.get('precision', 'fp32')} dim {fingerprint['dim']}, embedded once in {embedded:.1f} s; "
          f"ranking depth {depth}", flush=True)

    def fmt(value) -> str:
        return "-" if value is None else f"{value:.4f}"

    rows = [(f"{name}{label}", fmt(table["float32"][key]), fmt(table["float16"][key]))
            for table, label in ((metrics, ", exact search"), (reranked, ", with QE + DBA re-ranking"))
            for name, key in (("mAP", "map"), ("R@1", "recall@1"), ("MAP@R", "map@r"), ("N-S score (0-4)", "ns_score"))
            if table["float32"][key] is not None]
    rows += [(f"abs(mAP difference){label}", "", f"{abs(table['float32']['map'] - table['float16']['map']):.1e}")
             for table, label in ((metrics, ", exact search"), (reranked, ", re-ranked"))]
    rows += [
        (f"top-{TOP} overlap (as sets, mean)", "", f"{as_set:.4f}"),
        (f"top-{TOP} identical in order (queries)", "", f"{in_order:.4f}"),
        (f"full ranking (depth {depth}) identical (queries)", "", f"{whole:.4f}"),
        ("max abs(cosine difference), all pairs", "", f"{pair_diff:.2e}"),
        ("max abs(1 - cos(float32 vector, float16 vector))", "", f"{self_diff:.2e}"),
        ("shards (.npy bytes)", *(f"{sum(s['bytes'] for s in st.manifest['shards']):,}" for st in stores.values())),
        ("whole index folder (bytes)", *(f"{folder_bytes(st.root):,}" for st in stores.values())),
    ]
    return rows


def print_table(name: str, rows: list[tuple[str, str, str]]) -> None:
    print(f"\n| {name} | float32 | float16 |\n|---|---:|---:|")
    for label, a, b in rows:
        print(f"| {label} | {a} | {b} |")
    print(flush=True)


def main() -> None:
    args = parse_args()
    work_root = args.work or Path(tempfile.mkdtemp(prefix="cbir-shard-dtype-"))
    tables = {}
    try:
        for text in args.datasets.split(","):
            dataset = Path(text).expanduser()
            if not dataset.is_dir():
                sys.exit(f"error: {dataset}: no such dataset folder (set CBIR_SHARED or pass --datasets)")
            work = work_root / dataset.name
            shutil.rmtree(work, ignore_errors=True)
            rows = compare(dataset, work, args)
            print_table(dataset.name, rows)
            tables[dataset.name] = rows
    finally:
        if args.work is None:
            shutil.rmtree(work_root, ignore_errors=True)
    table = [{"figure": f"{name}: {label}", "float32": a, "float16": b}
             for name, rows in tables.items() for label, a, b in rows]
    print(f"written {write_result('shard_dtype', {'table': table})}")


if __name__ == "__main__":
    main()
