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
    """The default pipeline: GeM over two full-image scales, DBA at index time,
    alpha-QE with the raw top-1 kept first at query time."""
    from cbir_cli.models.registry import DEFAULT_DESCRIPTOR
    from cbir_cli.pipeline.options import ExtractOptions
    from cbir_cli.pipeline.sync import index_folder
    from cbir_cli.search.dba import load_augmentation
    from cbir_cli.search.rerank import RerankSettings
    from cbir_cli.search.searcher import Searcher

    assert mobilenet.config.descriptor == DEFAULT_DESCRIPTOR
    root = shared_dir / "datasets" / "ukbench_mini"
    summary = index_folder(root, tmp_path / "idx", embedder=mobilenet, options=ExtractOptions(workers=1))
    assert summary.store_count == 56 and summary.skipped == 0
    searcher = Searcher.open(tmp_path / "idx", embedder=mobilenet, rerank=RerankSettings())
    assert load_augmentation(searcher.store) is not None and "re-ranked" in searcher.index_type
    rows = searcher.rows
    results = searcher.search_ids([r.id for r in rows], k=4)
    # N-S score: group-mates in the top 4 (the query itself included), max 4.0.
    group = {r.id: r.path.split("/")[-2] for r in rows}
    hits = defaultdict(int)
    for row, result in zip(rows, results):
        hits[row.id] = sum(group[h.id] == group[row.id] for h in result)
        assert result[0].id == row.id and result[0].score == pytest.approx(1.0, abs=1e-4)
    ns_score = sum(hits.values()) / len(rows)
    # The default pipeline scores 4.00 on these 14 groups (the legacy GAP too);
    # random features ~1.2.
    assert ns_score >= 3.9, ns_score
    # An uploaded photo (decoded, embedded, searched): its own file comes first.
    hits = searcher.search_paths([rows[5].path], k=4)[0]
    assert hits[0].id == rows[5].id and hits[0].score == pytest.approx(1.0, abs=1e-3)
