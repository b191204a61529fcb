"""cbir evaluate: self-hit removal, metrics wiring, the feature cache, the report,
and the SOP layout end to end through the CLI with the tiny model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image
from typer.testing import CliRunner

from cbir_cli.cli import app
from cbir_cli.evaluate.datasets import load_folder
from cbir_cli.evaluate.features import (
    FeatureSource,
    cache_features,
    deep_source,
    default_features_root,
    descriptor_source,
)
from cbir_cli.evaluate.run import EvaluationOptions, drop_self_hits, evaluate, rank_all_vs_all, score_rankings
from cbir_cli.pipeline.executor import EmbedRequest
from cbir_cli.pipeline.options import ExtractOptions

PRODUCTS = 6
VARIANTS = 3
HEADER = "image_id class_id super_class_id path\n"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never write into the real user cache (but keep finding torch's installed
    weights, which live under the same XDG cache by default)."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    monkeypatch.setenv("TORCH_HOME", os.path.expanduser(torch_home))
    cache = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.delenv("CBIR_CACHE", raising=False)  # the user cache's default place, here under tmp_path
    return cache


def save_variant(seed: int, variant: int, target: Path) -> None:
    """A near-duplicate photo of product ``seed``: slightly smaller and recompressed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    make_image(seed).resize((160 - 8 * variant, 120 - 6 * variant)).save(target, quality=95 - 10 * variant)


@pytest.fixture
def sop_root(tmp_path: Path) -> Path:
    """A tiny Stanford-Online-Products tree: 6 test products x 3 near-duplicate
    photos (products 0-2 in super-class 1 "bike", 3-5 in super-class 2 "chair"),
    and 2 train products x 2 photos."""
    root = tmp_path / "sop"
    test_lines, train_lines = [], []
    for p in range(PRODUCTS):
        folder = "bike_final" if p < 3 else "chair_final"
        for v in range(VARIANTS):
            rel = f"{folder}/p{p}_{v}.JPG"
            save_variant(100 + p, v, root / rel)
            test_lines.append((100 + p, 1 if p < 3 else 2, rel))
    for p in range(2):
        for v in range(2):
            rel = f"train_final/t{p}_{v}.JPG"
            save_variant(200 + p, v, root / rel)
            train_lines.append((p + 1, 3, rel))
    for name, rows in (("Ebay_test.txt", test_lines), ("Ebay_train.txt", train_lines)):
        body = "".join(f"{i + 1} {c} {s} {rel}\n" for i, (c, s, rel) in enumerate(rows))
        (root / name).write_text(HEADER + body)
    return root


def run_cli(*args: str) -> dict:
    result = CliRunner().invoke(app, ["evaluate", *args, "--model", "test_tiny", "--workers", "0", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# --------------------------------------------------------------------------- self-hit removal


def test_drop_self_hits_removes_the_query_by_index() -> None:
    ranked = np.array([
        [0, 2, 1],  # self first: dropped
        [2, 1, 0],  # self in the middle
        [0, 1, 3],  # self (2) missing: an exact duplicate outranked it -> last column dropped
        [2, 1, 0],  # self (3) missing
    ])
    assert drop_self_hits(ranked).tolist() == [[2, 1], [2, 0], [0, 1], [2, 1]]


def test_rank_all_vs_all_never_returns_the_query_even_with_duplicates() -> None:
    e = np.eye(3, dtype=np.float32)
    vectors = np.stack([e[0], e[0], e[0], e[1], e[2] * 0.0])  # three identical rows, one zero vector
    ranked = rank_all_vs_all(vectors, depth=4)
    assert ranked.shape == (5, 4)
    for i, row in enumerate(ranked):
        assert i not in row.tolist()
        assert sorted(row.tolist()) == sorted(set(range(5)) - {i})  # the whole gallery, each once
    assert set(ranked[0, :2].tolist()) == {1, 2}  # the duplicates come first
    # Depth beyond the gallery pads with -1.
    assert rank_all_vs_all(vectors[:3], depth=4)[:, 2:].tolist() == [[-1, -1]] * 3


# --------------------------------------------------------------------------- metrics wiring


def test_score_rankings_by_hand() -> None:
    # labels: 0 0 0 1 1 2 (class 2 is a singleton: a query without positive)
    labels = np.array([0, 0, 0, 1, 1, 2])
    ranked = np.array([
        [1, 3, 2, 4, 5],  # q0: rel at ranks 1, 3 -> AP = (1 + 2/3) / 2
        [3, 0, 2, 4, 5],  # q1: rel at 2, 3     -> AP = (1/2 + 2/3) / 2
        [0, 1, 3, 4, 5],  # q2: rel at 1, 2     -> AP = 1
        [4, 0, 1, 2, 5],  # q3: rel at 1        -> AP = 1
        [0, 1, 2, 3, 5],  # q4: rel at 4        -> AP = 1/4
        [0, 1, 2, 3, 4],  # q5: no positive, excluded
    ])
    options = EvaluationOptions(recall_ks=(1, 2, 10), k=2)
    m = score_rankings(labels, ranked, options)
    assert m["queries"] == 5 and m["queries_without_positive"] == 1 and m["gallery"] == 5
    assert m["recall@1"] == pytest.approx(3 / 5)
    assert m["recall@2"] == pytest.approx(4 / 5)
    assert m["recall@10"] is None  # deeper than the 5 other images
    ap = [(1 + 2 / 3) / 2, (1 / 2 + 2 / 3) / 2, 1.0, 1.0, 1 / 4]
    assert m["map"] == pytest.approx(np.mean(ap))
    # MAP@R: R = 2, 2, 2, 1, 1 -> q0 1/2, q1 1/4, q2 1, q3 1, q4 0
    assert m["map@r"] == pytest.approx(np.mean([0.5, 0.25, 1.0, 1.0, 0.0]))
    assert m["precision@2"] == pytest.approx(np.mean([1, 1, 2, 1, 0]) / 2)
    assert m["ir_recall@2"] == pytest.approx(np.mean([1 / 2, 1 / 2, 1, 1, 0]))
    # One name per metric: Top-K accuracy is R@K, not a second key.
    assert not any("accuracy" in key for key in m)
    assert m["ns_score"] is None  # classes are not all of size 4
    assert any("R@[10]" in n for n in m["notes"])


def test_score_rankings_reports_ns_for_groups_of_four_and_skips_shallow_map_at_r() -> None:
    labels = np.repeat([0, 1], 4)
    perfect = np.array([[j for j in np.argsort(labels != labels[i], kind="stable") if j != i] for i in range(8)])
    m = score_rankings(labels, perfect, EvaluationOptions())
    assert m["ns_score"] == pytest.approx(4.0) and m["map"] == pytest.approx(1.0)
    shallow = score_rankings(labels, perfect[:, :2], EvaluationOptions())
    assert shallow["map@r"] is None and any("MAP@R not computed" in n for n in shallow["notes"])
    assert any("mAP over the top 2" in n for n in shallow["notes"])


# --------------------------------------------------------------------------- feature cache


def test_feature_cache_reuses_vectors_and_drops_unreadable(tmp_path: Path, image_folder, tiny_embedder) -> None:
    folder = image_folder(5)
    broken = folder / "img_999.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    paths = sorted(str(p) for p in folder.iterdir())
    source = FeatureSource("deep", "tiny", tiny_embedder.fingerprint(),
                           EmbedRequest("test_tiny", embedder=tiny_embedder))
    assert source.fingerprint == deep_source("test_tiny", None, ExtractOptions()).fingerprint  # what the CLI records
    options = ExtractOptions(workers=0, batch_size=2)
    store = tmp_path / "store"
    first = cache_features(paths, store, source, options)
    assert first.embedded == 5 and first.vectors.shape == (5, 256)
    assert first.readable.tolist() == [True] * 5 + [False]
    assert [p for p, _ in first.unreadable] == [str(broken)]
    # A subset, then everything again: nothing re-embedded, same vectors.
    subset = cache_features(paths[:3], store, source, options)
    again = cache_features(paths, store, source, options)
    assert subset.embedded == 0 and again.embedded == 0
    np.testing.assert_array_equal(subset.vectors, first.vectors[:3])
    np.testing.assert_array_equal(again.vectors, first.vectors)
    assert [p for p, _ in again.unreadable] == [str(broken)]  # remembered, not decoded again


def test_default_cache_is_per_dataset_under_the_user_cache(isolated_cache: Path, tmp_path: Path,
                                                           image_folder) -> None:
    image_folder(4, name="ds/a")
    image_folder(4, name="ds/b", seed0=10)
    coll = load_folder(tmp_path / "ds")
    options = EvaluationOptions(features=("deep", "hsv"), model="test_tiny",
                                extract=ExtractOptions(workers=0))
    result = evaluate(coll, options)
    root = default_features_root(coll)
    assert root.is_relative_to(isolated_cache)
    stores = sorted(p.name for p in root.iterdir())
    assert [s.split("-")[0] for s in stores] == ["hsv", "test_tiny"]
    assert [r.store_dir.parent for r in result.results] == [root, root]
    assert result.results[1].metrics["gallery"] == 7 and result.results[1].embedded == 8
    assert descriptor_source("hsv").fingerprint["dim"] == 288


# --------------------------------------------------------------------------- SOP end to end


def test_sop_end_to_end_near_duplicates_and_controls(sop_root: Path, tmp_path: Path) -> None:
    features = tmp_path / "features"
    out = run_cli("--dataset", "sop", "--root", str(sop_root), "--features-dir", str(features))
    (deep,) = out["results"]
    m = deep["metrics"]
    # 18 queries, each with 2 near-duplicates of the same product among 17 others.
    assert m["queries"] == 18 and m["gallery"] == 17 and m["queries_without_positive"] == 0
    assert m["recall@1"] == 1.0 and m["recall@5"] == 1.0
    assert m["map@r"] == 1.0 and m["map"] == 1.0
    assert m["precision@5"] == pytest.approx(2 / 5) and m["ir_recall@5"] == 1.0
    assert deep["embedded"] == 18 and out["relevance"] == "product"

    # Super-class level (same super_class_id relevant): 8 relevant per query, re-uses the cache.
    sup = run_cli("--dataset", "sop", "--root", str(sop_root), "--features-dir", str(features),
                  "--relevance", "superclass")
    assert "superclass" in sup["relevance_label"]
    assert sup["results"][0]["embedded"] == 0 and sup["results"][0]["cached"] == 18
    assert sup["results"][0]["metrics"]["recall@1"] == 1.0
    assert sup["results"][0]["metrics"]["precision@5"] >= m["precision@5"]

    # Shuffled-label control: product p, photo v gets class (p + v) mod 6, so a
    # photo's near-duplicates (the top hits) are never in its class: R@1 = 0.
    lines = (sop_root / "Ebay_test.txt").read_text().splitlines()
    def shuffled_class(i: int) -> int:
        product, variant = divmod(i - 1, VARIANTS)
        return 100 + (product + variant) % PRODUCTS

    shuffled = [lines[0]] + [f"{i} {shuffled_class(i)} 1 {line.split()[3]}"
                             for i, line in enumerate(lines[1:], start=1)]
    (sop_root / "Ebay_test.txt").write_text("\n".join(shuffled) + "\n")
    control = run_cli("--dataset", "sop", "--root", str(sop_root), "--features-dir", str(features))
    cm = control["results"][0]["metrics"]
    assert cm["queries"] == 18 and cm["recall@1"] == 0.0 and cm["map"] < m["map"]

    # The train split is its own set of products.
    train = run_cli("--dataset", "sop", "--root", str(sop_root), "--split", "train",
                    "--features-dir", str(features))
    assert train["results"][0]["metrics"]["queries"] == 4


def test_handcrafted_features_share_the_search_and_metrics(sop_root: Path, tmp_path: Path) -> None:
    out = run_cli("--dataset", "sop", "--root", str(sop_root), "--features", "hsv,hog",
                  "--features-dir", str(tmp_path / "f"))
    assert [r["feature"] for r in out["results"]] == ["hsv", "hog"]
    for r in out["results"]:
        assert r["metrics"]["queries"] == 18
        assert r["metrics"]["recall@1"] == 1.0  # near-duplicates look alike to colour and edges too


def test_cli_errors_are_one_line(sop_root: Path, tmp_path: Path, image_folder) -> None:
    runner = CliRunner()
    folder = image_folder(2, name="ds/a")
    cases = [
        (["--dataset", "folder", "--root", str(folder.parent), "--relevance", "superclass"],
         "superclass relevance needs super-class labels"),
        (["--dataset", "sop", "--root", str(sop_root), "--features", "colour"], "unknown feature kind(s) 'colour'"),
        (["--dataset", "sop", "--root", str(tmp_path / "nope")], "dataset folder does not exist"),
        (["--dataset", "sop", "--root", str(sop_root), "--recall-at", "1,x"], "--recall-at wants comma-separated"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["evaluate", *args, "--model", "test_tiny", "--workers", "0"])
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output
        last = result.stderr.strip().splitlines()[-1]
        assert message in last and last.startswith("error:")


# --------------------------------------------------------------------------- report


def test_report_marks_relevant_results(sop_root: Path, tmp_path: Path) -> None:
    from PIL import Image

    from cbir_cli.evaluate import report
    from cbir_cli.imageio.thumbnails import FRAME, GAP

    report_dir = tmp_path / "report"
    result = CliRunner().invoke(app, ["evaluate", "--dataset", "sop", "--root", str(sop_root), "--model",
                                      "test_tiny", "--workers", "0", "--features-dir", str(tmp_path / "f"),
                                      "--report", str(report_dir), "--report-queries", "3", "-k", "4"])
    assert result.exit_code == 0, result.output
    assert "R@1" in result.stdout and "relevant: same product" in result.stdout
    page = (report_dir / "index.html").read_text()
    assert "deep (test_tiny)" in page and "R@1" in page
    for name in (s.split('"')[0] for s in page.split('src="thumbs/')[1:]):
        assert (report_dir / "thumbs" / name).is_file()
    grid = Image.open(report_dir / "grid-deep.png").convert("RGB")
    side = report.THUMB + 2 * FRAME
    assert grid.size == (5 * side + 6 * GAP, 3 * (side + GAP) + GAP)

    def frame(row: int, col: int) -> tuple[int, int, int]:
        return grid.getpixel((GAP + col * (side + GAP) + 1, GAP + row * (side + GAP) + 1))

    # Each query's two near-duplicates come first (green), then other products (red).
    for row in range(3):
        assert frame(row, 0) == report.QUERY_COLOUR
        assert [frame(row, c) for c in (1, 2, 3)] == [report.RELEVANT_COLOUR] * 2 + [report.IRRELEVANT_COLOUR]


# --------------------------------------------------------------------------- real data


@pytest.mark.real
@pytest.mark.slow
def test_ukbench_mini_deep_beats_colour_histograms(shared_dir: Path, tmp_path: Path) -> None:
    from conftest import mobilenet_weights_path

    root = shared_dir / "datasets" / "ukbench_mini"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    if mobilenet_weights_path() is None:
        pytest.skip("mobilenet_v2 weights not installed (cbir weights install mobilenet_v2)")
    result = CliRunner().invoke(app, ["evaluate", "--dataset", "folder", "--root", str(root), "--model",
                                      "mobilenet_v2", "--features", "deep,hsv", "--features-dir",
                                      str(tmp_path / "f"), "--json"])
    assert result.exit_code == 0, result.output
    deep, hsv = (r["metrics"] for r in json.loads(result.stdout)["results"])
    assert deep["queries"] == 56 and deep["gallery"] == 55
    # UKBench groups of 4: the N-S score is reported, and pretrained CNN features
    # find the other views of an object better than colour alone.
    assert deep["ns_score"] is not None and hsv["ns_score"] is not None
    assert deep["ns_score"] > hsv["ns_score"] > 2.0
