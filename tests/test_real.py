"""Real MobileNetV2 ImageNet weights on real photos (UKBench-mini). Skipped with a
reason when the weights (`cbir weights install mobilenet_v2`) or data are absent."""

from __future__ import annotations

from collections import defaultdict

import pytest

from tests.conftest import mobilenet_weights_path

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def mobilenet():
    if mobilenet_weights_path() is None:
        pytest.skip("MobileNetV2 weights not installed (run `cbir weights install mobilenet_v2`)")
    from cbir_cli.models.loading import load_embedder

    return load_embedder("mobilenet_v2", device="cpu")


def test_mobilenet_finds_ukbench_group_mates(mobilenet, shared_dir, tmp_path):
    from cbir_cli.pipeline.options import ExtractOptions
    from cbir_cli.pipeline.sync import index_folder
    from cbir_cli.search.searcher import Searcher

    root = shared_dir / "datasets" / "ukbench_mini"
    summary = index_folder(root, tmp_path / "idx", embedder=mobilenet, options=ExtractOptions(workers=1))
    assert summary.store_count == 56 and summary.skipped == 0
    searcher = Searcher.open(tmp_path / "idx", embedder=mobilenet)
    rows = searcher.rows
    results = searcher.search_ids([r.id for r in rows], k=4)
    # N-S score: group-mates in the top 4 (the query itself included), max 4.0.
    group = {r.id: r.path.split("/")[-2] for r in rows}
    hits = defaultdict(int)
    for row, result in zip(rows, results):
        hits[row.id] = sum(group[h.id] == group[row.id] for h in result)
        assert result[0].id == row.id and result[0].score == pytest.approx(1.0, abs=1e-4)
    ns_score = sum(hits.values()) / len(rows)
    # MobileNetV2 ImageNet features score ~3.6 on these 14 groups; random features ~1.2.
    assert ns_score >= 3.0, ns_score
