"""The clip family (issue 24) on a tiny open_clip model with random weights: a
custom config registered with open_clip, its checkpoint saved in open_clip's
format and loaded through ``--weights`` -- the real loading code, no download."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import MODEL  # the tiny model; its fixtures (tiny_clip, tiny_clip_embedder): conftest
from typer.testing import CliRunner

from cbir_cli.cli import app

open_clip = pytest.importorskip("open_clip")
runner = CliRunner()


def invoke_json(args: list[str]) -> object:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_image_and_text_vectors_have_the_models_dim_and_unit_length(tiny_clip_embedder, tiny_clip):
    from conftest import make_image

    from cbir_cli.models.protocol import TextEmbedder

    images = tiny_clip_embedder.embed_images([make_image(1), make_image(2, size=(40, 90))])
    texts = tiny_clip_embedder.embed_text(["a yellow flower", "a dog on a beach at night"])
    assert isinstance(tiny_clip_embedder, TextEmbedder)
    assert images.shape == (2, 24) and texts.shape == (2, 24) and images.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1, atol=1e-5)
    assert not np.allclose(texts[0], texts[1])
    fp = tiny_clip_embedder.fingerprint()
    assert (fp["model"], fp["family"], fp["dim"], fp["pretrained"]) == (MODEL, "clip", 24, None)
    assert fp["weights"].startswith("file-sha256:")


def test_a_file_that_is_not_the_models_checkpoint_is_one_line(tiny_clip, tmp_path):
    from cbir_cli.errors import CbirError
    from cbir_cli.models.loading import load_embedder

    wrong = tmp_path / "wrong.pt"
    import torch

    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(CbirError, match="not an open_clip cbir-tiny-clip checkpoint"):
        load_embedder(MODEL, weights=wrong, device="cpu")


def test_offline_without_weights_names_the_file_and_how_to_supply_it(monkeypatch, tmp_path):
    import huggingface_hub.constants

    from cbir_cli.errors import WeightsUnavailableError
    from cbir_cli.models.loading import load_embedder

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    with pytest.raises(WeightsUnavailableError) as caught:
        load_embedder("clip:ViT-B-32/laion2b_s34b_b79k", device="cpu")
    message = caught.value.message
    assert "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in message and "open_clip_pytorch_model.bin" in message
    assert "--weights FILE" in message and "CBIR_OFFLINE is set" in message and "\n" not in message


def test_cbir_models_lists_the_clip_models_with_text():
    rows = invoke_json(["models", "--json"])
    clip = next(r for r in rows if r["name"] == "clip:ViT-B-32/laion2b_s34b_b79k")
    assert (clip["family"], clip["dim"], clip["has_text"]) == ("clip", 512, True)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def test_text_combined_and_negative_queries_rank_by_the_documented_sum(tiny_clip, tiny_clip_embedder,
                                                                       image_folder, index_env, tmp_path):
    from conftest import make_image

    from cbir_cli.imageio.decode import load_image
    from cbir_cli.search.searcher import Searcher

    folder = image_folder(12)
    summary = invoke_json(["index", str(folder), "--model", MODEL, "--weights", str(tiny_clip),
                           "--workers", "0", "--json"])
    assert summary["added"] == 12
    # Incremental: nothing to do the second time; `cbir check` finds the model able to make these vectors.
    again = invoke_json(["index", str(folder), "--model", MODEL, "--weights", str(tiny_clip), "--workers", "0",
                         "--json"])
    assert again["added"] == 0
    checked = runner.invoke(app, ["check"])
    assert checked.exit_code == 0, checked.output
    searcher = Searcher.open(index_env)
    ids = np.array([r.id for r in searcher.rows], dtype=np.int64)
    stored = searcher.backend.vectors(ids)
    query_file = tmp_path / "beach.jpg"
    make_image(99).save(query_file, quality=90)
    image = tiny_clip_embedder.embed_images([load_image(query_file, draft_size=32)])[0]
    text = tiny_clip_embedder.embed_text(["a red square", "at night", "people"])

    def expect(q: np.ndarray) -> list[int]:
        return [int(i) for i in ids[np.argsort(-(stored @ _unit(q)), kind="stable")]]

    cases = [
        (["--text", "a red square"], text[0]),
        (["--text", "a red square", "--text", "2:at night"], text[0] + 2 * text[1]),
        ([str(query_file), "--text", "at night", "--not", "people"], image + text[1] - text[2]),
        ([str(query_file), "--not", "0.5:people"], image - 0.5 * text[2]),
    ]
    for args, q in cases:
        answer, = invoke_json(["query", *args, "-k", "12", "--no-rerank", "--json"])
        assert [h["id"] for h in answer["results"]] == expect(q), args
        np.testing.assert_allclose([h["cosine"] for h in answer["results"]],
                                   np.sort(stored @ _unit(q))[::-1], atol=2e-4)
    answer, = invoke_json(["query", "--text", "at night", "--not", "people", "--json", "-k", "3"])
    assert (answer["text"], answer["not"], len(answer["results"])) == (["at night"], ["people"], 3)
    # --min-score filters a word query as any other: the hits above it, in the same order.
    cosines = np.sort(stored @ _unit(text[0]))[::-1]
    threshold = float((cosines[5] + cosines[6]) / 2)
    answer, = invoke_json(["query", "--text", "a red square", "--no-rerank", "--json", "-k", "12",
                           "--min-score", f"{threshold:.6f}"])
    assert [h["id"] for h in answer["results"]] == expect(text[0])[:6]
    # The JSON API's text/not fields (the web server) make the same query.
    from cbir_cli.serve.app import create_app

    client = create_app(Searcher.open(index_env)).test_client()
    found = client.get("/api/search", query_string={"text": "at night", "not": "people", "k": 12})
    assert found.status_code == 200, found.get_json()
    body = found.get_json()
    assert (body["query"]["text"], body["query"]["not"]) == (["at night"], ["people"])
    with query_file.open("rb") as fh:
        posted = client.post("/api/search", data={"image": (fh, "beach.jpg"), "text": "at night", "not": "people",
                                                  "k": "12"}).get_json()
    assert posted["query"]["text"] == ["at night"]
    # A searcher opened without re-ranking: the plain cosine order of the documented sum.
    assert [h["id"] for h in body["results"]] == expect(text[1] - text[2])
    assert [h["id"] for h in posted["results"]] == expect(image + text[1] - text[2])


def test_a_text_query_on_a_model_without_a_text_tower_is_one_line(image_folder, index_env):
    folder = image_folder(4)
    invoke_json(["index", str(folder), "--model", "test_tiny", "--workers", "0", "--json"])
    result = runner.invoke(app, ["query", "--text", "a yellow flower"])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "test_tiny has no text tower" in lines[0] and "clip:ViT-B-32/laion2b_s34b_b79k" in lines[0]


def test_text_query_metrics_against_a_hand_computed_case():
    from cbir_cli.evaluate.text_queries import class_prompt, score_text_queries

    images = np.array([[1, 0], [0.8, 0.6], [0.6, 0.8], [0, 1]], dtype=np.float32)
    labels = np.array([0, 1, 0, 1])
    queries = np.array([[1, 0], [0.6, 0.8]], dtype=np.float32)
    ap, recall = score_text_queries(queries, np.array([0, 1]), images, labels, (1, 2))
    # class 0 ranks images 0,1,2,3 (labels 0,1,0,1): AP = (1/1 + 2/3) / 2;
    # class 1 ranks 2,1,3,0 (labels 0,1,1,0): AP = (1/2 + 2/3) / 2, no hit at rank 1.
    np.testing.assert_allclose(ap, [(1 + 2 / 3) / 2, (1 / 2 + 2 / 3) / 2])
    np.testing.assert_array_equal(recall[1], [1, 0])
    np.testing.assert_array_equal(recall[2], [1, 1])
    assert class_prompt("a photo of a {}", "golden_retriever") == "a photo of a golden retriever"


def test_cbir_evaluate_text_queries_per_class_and_overall(tiny_clip, tmp_path):
    from conftest import make_image

    root = tmp_path / "classes"
    for c, name in enumerate(["red_square", "blue_circle", "tree"]):
        (root / name).mkdir(parents=True)
        for i in range(3):
            make_image(10 * c + i).save(root / name / f"{i}.jpg", quality=90)
    base = ["evaluate", "--dataset", "folder", "--root", str(root), "--text-queries", "--workers", "0",
            "--features-dir", str(tmp_path / "features"), "--recall-at", "1,2", "--json"]
    out = invoke_json([*base, "--model", MODEL, "--weights", str(tiny_clip), "--prompt", "a picture of {}"])
    assert [c["prompt"] for c in out["classes"]] == ["a picture of blue circle", "a picture of red square",
                                                     "a picture of tree"]
    assert all(c["images"] == 3 and 0 < c["ap"] <= 1 for c in out["classes"])
    assert out["overall"]["map"] == pytest.approx(np.mean([c["ap"] for c in out["classes"]]))
    assert out["overall"]["recall@2"] == pytest.approx(np.mean([c["recall@2"] for c in out["classes"]]))
    result = runner.invoke(app, [*base, "--model", "test_tiny"])
    assert result.exit_code != 0
    assert "model test_tiny has no text tower; use one that has: clip:" in result.output


def test_onnx_towers_equal_torch_and_are_cached(tiny_clip, tiny_clip_embedder, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from conftest import make_image

    from cbir_cli.models.clip_onnx import clip_export_paths
    from cbir_cli.models.loading import load_embedder
    from cbir_cli.models.protocol import TextEmbedder

    monkeypatch.setenv("CBIR_CACHE", str(tmp_path / "cache"))
    onnx = load_embedder(MODEL, weights=tiny_clip, device="cpu", runtime="onnx")
    assert isinstance(onnx, TextEmbedder) and type(onnx).__name__ == "ClipOnnxEmbedder"
    assert onnx.fingerprint() == tiny_clip_embedder.fingerprint()
    images = [make_image(5), make_image(6, size=(90, 40))]
    texts = ["a red square", "a dog on a beach at night"]
    np.testing.assert_allclose((onnx.embed_images(images) * tiny_clip_embedder.embed_images(images)).sum(1), 1,
                               atol=1e-4)
    np.testing.assert_allclose((onnx.embed_text(texts) * tiny_clip_embedder.embed_text(texts)).sum(1), 1, atol=1e-4)
    image_file, text_file = clip_export_paths(onnx.config, onnx.weights_id, tmp_path / "cache" / "onnx")
    assert image_file.is_file() and text_file.is_file()
    stamp = image_file.stat().st_mtime_ns
    load_embedder(MODEL, weights=tiny_clip, device="cpu", runtime="onnx")
    assert image_file.stat().st_mtime_ns == stamp  # read from the cache, not exported again


def test_cbir_models_prints_clip_names_whole_on_a_narrow_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    result = runner.invoke(app, ["models"], terminal_width=80)
    assert result.exit_code == 0 and "clip:ViT-B-32/laion2b_s34b_b79k" in result.output, result.output
