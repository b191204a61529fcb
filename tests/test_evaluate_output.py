"""What ``cbir evaluate`` prints, writes as --json and puts in its report: bootstrap
intervals on every metric, the versions and settings behind the figures, one name
per metric, the dataset's own word for "relevant", the cost of re-ranking beside
its gains, and hand-crafted baselines ranked without re-ranking."""

from __future__ import annotations

import json
import os
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image
from typer.testing import CliRunner

from cbir_cli.cli import app
from cbir_cli.evaluate.datasets import load_collection
from cbir_cli.evaluate.run import EvaluationOptions, evaluate, score_rankings
from cbir_cli.pipeline.options import ExtractOptions

CLASSES = 4
PHOTOS = 3


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never write into the real user cache (torch's installed weights stay found)."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    monkeypatch.setenv("TORCH_HOME", os.path.expanduser(torch_home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    return tmp_path / "xdg-cache"


@pytest.fixture
def folder_root(tmp_path: Path) -> Path:
    """One sub-folder per class; the third photo of each scene is filed under the
    next class, so some queries find their class first and some do not."""
    root = tmp_path / "flowers"
    for scene in range(CLASSES):
        for photo in range(PHOTOS):
            cls = (scene + (photo == PHOTOS - 1)) % CLASSES
            target = root / f"class_{cls}" / f"s{scene}_{photo}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            make_image(300 + scene).resize((160 - 8 * photo, 120 - 6 * photo)).save(target, quality=95 - 10 * photo)
    return root


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, ["evaluate", *args, "--model", "test_tiny", "--workers", "0"])
    assert result.exit_code == 0, result.output
    return result.stdout


def metric_keys(metrics: dict) -> list[str]:
    return [k for k, v in metrics.items() if isinstance(v, float)]


# --------------------------------------------------------------------------- intervals


def test_score_rankings_intervals_against_the_enumerated_bootstrap() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2])
    ranked = np.array([[1, 3, 2, 4, 5], [3, 0, 2, 4, 5], [0, 1, 3, 4, 5], [4, 0, 1, 2, 5], [0, 1, 2, 3, 5],
                       [0, 1, 2, 3, 4]])
    m = score_rankings(labels, ranked, EvaluationOptions(recall_ks=(1, 2, 10), k=2))
    # R@1 per query is 1, 0, 1, 1, 0 (q5 has no positive): its resampled mean is
    # k/5 with k ~ Binomial(5, 3/5), whose 2.5 % and 97.5 % points are 1/5 and 1
    # (see test_intervals.enumerated_interval).
    assert m["recall@1"] == pytest.approx(0.6)
    assert m["intervals"]["recall@1"] == [pytest.approx(0.2), 1.0]
    assert m["intervals"]["recall@10"] is None and m["recall@10"] is None  # deeper than the gallery
    for key in metric_keys(m):
        low, high = m["intervals"][key]
        assert low <= m[key] <= high, key
    # More of the same queries: a narrower interval around the same R@1.
    many = score_rankings(np.tile(labels, 40) + np.repeat(np.arange(40) * 3, 6),
                          np.concatenate([ranked + 6 * i for i in range(40)]), EvaluationOptions(recall_ks=(1,), k=2))
    assert many["recall@1"] == pytest.approx(0.6)
    assert many["intervals"]["recall@1"][1] - many["intervals"]["recall@1"][0] < 0.8 / 3


def test_json_carries_intervals_versions_and_settings(folder_root: Path, tmp_path: Path) -> None:
    out = json.loads(invoke("--dataset", "folder", "--root", str(folder_root), "--features-dir",
                            str(tmp_path / "f"), "--json"))
    assert out["intervals"] == {"method": "percentile bootstrap over queries", "resamples": 1000, "seed": 0,
                                "confidence": 0.95}
    env = out["environment"]
    assert env["cbir-cli"] == __import__("cbir_cli").__version__
    assert env["torch"] == version("torch") and env["numpy"] == version("numpy")
    assert env["onnxruntime"] == version("onnxruntime") and env["faiss"] == version("faiss-cpu")
    (deep,) = out["results"]
    settings = deep["settings"]
    assert settings["model"] == "test_tiny" and settings["weights"] == "random-seed-0"
    assert settings["precision"] == "fp32" and settings["runtime"] == "torch" and settings["device"] == "cpu"
    assert settings["descriptor"] == {"pooling": "gem", "input": "full", "scales": [1.0, 1.4], "gem_p": 3.0}
    assert settings["reranked"] is True
    assert settings["rerank"] == {"qe_depth": 3, "qe_alpha": 3.0, "pin_first": True, "use_dba": True}
    assert settings["dba"] == {"depth": 3, "alpha": 3.0}
    m = deep["metrics"]
    assert m["queries"] == CLASSES * PHOTOS
    assert set(metric_keys(m)) <= set(m["intervals"])
    for key in metric_keys(m):
        low, high = m["intervals"][key]
        assert low <= m[key] <= high, key
    assert any(high > low for low, high in (m["intervals"][k] for k in metric_keys(m)))
    assert deep["query_ms"] > 0
    # Off on request.
    off = json.loads(invoke("--dataset", "folder", "--root", str(folder_root), "--features-dir",
                            str(tmp_path / "f"), "--json", "--bootstrap", "0", "--no-rerank"))
    assert set(off["results"][0]["metrics"]["intervals"].values()) == {None}
    assert off["results"][0]["settings"]["rerank"] is None and off["results"][0]["settings"]["dba"] is None


# --------------------------------------------------------------------------- the table


def test_table_names_each_metric_once_with_intervals_and_same_class(folder_root: Path, tmp_path: Path) -> None:
    text = invoke("--dataset", "folder", "--root", str(folder_root), "--features-dir", str(tmp_path / "f"))
    lines = text.splitlines()
    # Top-K accuracy is R@K: one row each, named both ways once, and said so.
    assert [line for line in lines if "Top-" in line and "note:" not in line] == \
        [line for line in lines if "R@1 " in line or "R@5 " in line]
    assert len([line for line in lines if "Top-1" in line]) == 1
    assert "R@K is Top-K accuracy" in text
    # Folder datasets: relevant means the same class (no SOP "product").
    assert "relevant: same class" in text and "product" not in text
    assert "95% intervals: percentile bootstrap over the 12 queries, 1000 resamples, seed 0" in text
    (map_row,) = [line for line in lines if "│ mAP" in line]
    assert "[" in map_row and "]" in map_row
    assert f"onnxruntime {version('onnxruntime')}" in text and "precision fp32, runtime torch" in text
    assert json.loads(invoke("--dataset", "folder", "--root", str(folder_root), "--features-dir",
                             str(tmp_path / "f"), "--json"))["relevance"] == "class"


def test_compare_rows_show_the_cost_of_re_ranking(folder_root: Path, tmp_path: Path) -> None:
    collection = load_collection("folder", folder_root)
    options = EvaluationOptions(features=("hsv", "hog"), features_dir=tmp_path / "f",
                                extract=ExtractOptions(workers=0))
    header, rows = evaluate(collection, options).compare_rows()
    assert header[:5] == ["variant", "R@1", "R@5 (Top-5)", "R@10", "mAP"] and header[-2:] == ["query ms", "features s"]
    for row in rows:
        assert float(row[header.index("query ms")]) > 0
        value, interval = row[header.index("mAP")].split("\n")
        low, high = (float(x) for x in interval.strip("[]").split(","))
        assert low <= float(value) <= high


def test_handcrafted_baselines_are_not_re_ranked_unless_asked(folder_root: Path, tmp_path: Path) -> None:
    args = ("--dataset", "folder", "--root", str(folder_root), "--features", "deep,hsv", "--features-dir",
            str(tmp_path / "f"), "--json")
    deep, hsv = json.loads(invoke(*args))["results"]
    assert hsv["ranking"] == "no re-ranking" and "re-ranked" in deep["ranking"]
    assert hsv["settings"]["reranked"] is False and deep["settings"]["reranked"] is True
    deep, hsv = json.loads(invoke(*args, "--rerank"))["results"]
    assert deep["settings"]["reranked"] is True and hsv["settings"]["reranked"] is True
    assert "re-ranked" in hsv["ranking"]


# --------------------------------------------------------------------------- the report


def test_report_shows_intervals_settings_and_versions(folder_root: Path, tmp_path: Path) -> None:
    invoke("--dataset", "folder", "--root", str(folder_root), "--features-dir", str(tmp_path / "f"),
           "--report", str(tmp_path / "report"), "--report-queries", "2")
    page = (tmp_path / "report" / "index.html").read_text()
    assert "relevant: <b>same class" in page and "product" not in page
    assert "95% intervals: percentile bootstrap over the 12 queries, 1000 resamples, seed 0" in page
    assert "R@K is Top-K accuracy" in page and page.count("Top-1") == 1
    assert "<h2>Settings</h2>" in page
    for cell in ("<td>test_tiny</td>", "<td>random-seed-0</td>", "<td>fp32</td>", "<td>torch</td>",
                 "<td>qe_depth=3, qe_alpha=3.0, pin_first=True, use_dba=True</td>", "<td>depth=3, alpha=3.0</td>"):
        assert cell in page, cell
    assert f"onnxruntime {version('onnxruntime')}" in page and f"faiss {version('faiss-cpu')}" in page
    assert page.count(" [") >= 5  # metric cells carry their intervals
