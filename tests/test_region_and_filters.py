"""Region queries (``--box``, the API's ``box``), more like this (``--id``,
``--path``: the stored vector, no model), filters (``--under``, ``--min-score``:
still K results when K qualify) and the visual output (``--report``, ``--grid``),
in the CLI, the library and the JSON API."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image
from PIL import Image
from typer.testing import CliRunner

from cbir_cli.cli import app
from cbir_cli.errors import CbirError
from cbir_cli.imageio.region import Box
from cbir_cli.pipeline.options import ExtractOptions
from cbir_cli.pipeline.sync import index_folder
from cbir_cli.search.filters import ResultFilter, filtered_search, passing_counts
from cbir_cli.search.queries import QueryRequest, answer_queries
from cbir_cli.search.searcher import Searcher
from tests.fakes import FakeBackend

LEFT, RIGHT = 3, 8  # the seeds of the two photos of the composite


def composite(left: int = LEFT, right: int = RIGHT) -> Image.Image:
    """Two photos side by side (320x120): the left one, then the right one."""
    out = Image.new("RGB", (320, 120))
    out.paste(make_image(left), (0, 0))
    out.paste(make_image(right), (160, 0))
    return out


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_embedder):
    """(root, index dir, composite file): photos/a/img_000..005, photos/b/img_006..011,
    indexed with the tiny model; the composite of img_003 and img_008 is not indexed."""
    root = tmp_path_factory.mktemp("region")
    for i in range(12):
        sub = root / "photos" / ("a" if i < 6 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        make_image(i).save(sub / f"img_{i:03d}.jpg", quality=95)
    index_dir = root / "index"
    index_folder(root / "photos", index_dir, options=ExtractOptions(workers=0), embedder=tiny_embedder)
    composite().save(root / "composite.png")
    return root, index_dir, root / "composite.png"


def query_json(*args: str) -> list[dict]:
    result = CliRunner().invoke(app, ["query", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def names(hits: list[dict]) -> list[str]:
    return [Path(h["path"]).name for h in hits]


def test_box_query_on_a_composite_finds_the_photo_in_the_box_first(indexed):
    root, index_dir, image = indexed
    right = query_json(str(image), "--index", str(index_dir), "--box", "0.5,0,1,1", "-k", "3")[0]
    assert names(right["results"])[0] == "img_008.jpg" and right["box"] == "0.5,0,1,1"
    left = query_json(str(image), "--index", str(index_dir), "--box", "0,0,160,120", "-k", "3")[0]
    assert names(left["results"])[0] == "img_003.jpg"
    # A region of an indexed image (here: all of it) is embedded from its file.
    whole = query_json("--path", str(root / "photos" / "b" / "img_008.jpg"), "--box", "0,0,1,1",
                       "--index", str(index_dir), "-k", "1")[0]
    assert names(whole["results"]) == ["img_008.jpg"] and whole["results"][0]["score"] > 0.999


@pytest.mark.parametrize(("text", "size", "pixels"), [
    ("0.5,0,1,1", (320, 120), (160, 0, 320, 120)),        # fractions
    ("0,0,160,120", (320, 120), (0, 0, 160, 120)),        # pixels
    ("100, 10, 900, 110", (320, 120), (100, 10, 320, 110)),  # clipped to the image
])
def test_box_reads_pixels_or_fractions(text, size, pixels):
    assert Box.parse(text).pixels(*size) == pixels


@pytest.mark.parametrize(("text", "fragment"), [
    ("1,2,3", "four numbers"), ("a,b,c,d", "four numbers"), ("0.5,0,0.2,1", "x0 < x1"),
    ("-1,0,5,5", "x0 < x1"), ("nan,0,1,1", "four numbers"),
])
def test_a_bad_box_is_one_clear_error(text, fragment):
    with pytest.raises(CbirError, match=fragment):
        Box.parse(text)
    with pytest.raises(CbirError, match="less than 8x8"):
        Box.parse("0,0,5,5").pixels(320, 120)


def test_id_and_path_queries_use_the_stored_vector_without_loading_the_model(indexed):
    root, index_dir, _ = indexed
    searcher = Searcher.open(index_dir)
    target = root / "photos" / "a" / "img_002.jpg"
    image_id = searcher.id_of_path(target)
    answers = answer_queries(searcher, QueryRequest(ids=[image_id], paths=[target]), 4)
    assert searcher._embedder is None  # no model was loaded: nothing was embedded
    for answer in answers:
        assert answer.id == image_id and answer.hits[0].id == image_id
        assert answer.hits[0].score == pytest.approx(1.0, abs=1e-5) and len(answer.hits) == 4
    by_id = query_json("--id", str(image_id), "--index", str(index_dir), "-k", "2")[0]
    assert by_id["id"] == image_id and names(by_id["results"])[0] == "img_002.jpg"
    missing = CliRunner().invoke(app, ["query", "--path", str(root / "composite.png"), "--index", str(index_dir)])
    assert missing.exit_code == 1 and "composite.png: not in the index" in missing.output
    unknown = CliRunner().invoke(app, ["query", "--id", "999", "--index", str(index_dir)])
    assert unknown.exit_code == 1 and "no image with id 999" in unknown.output
    nothing = CliRunner().invoke(app, ["query", "--index", str(index_dir)])
    assert nothing.exit_code == 1 and "nothing to search with" in nothing.output


def test_under_keeps_only_a_folder_and_still_returns_k(indexed):
    root, index_dir, _ = indexed
    query = str(root / "photos" / "a" / "img_001.jpg")
    plain = query_json(query, "--index", str(index_dir), "-k", "4")[0]["results"]
    assert names(plain)[0] == "img_001.jpg"
    only_b = query_json(query, "--index", str(index_dir), "-k", "4", "--under", str(root / "photos" / "b"))[0]
    assert len(only_b["results"]) == 4 and all("/photos/b/" in h["path"] for h in only_b["results"])
    assert [h["rank"] for h in only_b["results"]] == [1, 2, 3, 4]
    # More than qualify: all of them, no padding.
    all_b = query_json(query, "--index", str(index_dir), "-k", "50", "--under", str(root / "photos" / "b"))[0]
    assert sorted(names(all_b["results"])) == [f"img_{i:03d}.jpg" for i in range(6, 12)]


def test_a_query_whose_min_score_passes_nothing_says_so(indexed):
    root, index_dir, _ = indexed
    query = str(root / "photos" / "a" / "img_001.jpg")
    result = CliRunner().invoke(app, ["query", query, "--index", str(index_dir), "--min-score", "1",
                                      "--under", "b"])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert f"note: {query}: no result at or above --min-score" in result.stderr
    # --json stays a plain list for programs (no hits), the note goes to stderr all the same.
    result = CliRunner().invoke(app, ["query", query, "--index", str(index_dir), "--min-score", "1", "--json",
                                      "--under", "b"])
    assert json.loads(result.stdout)[0]["results"] == []
    assert "no result" in result.stderr


def test_under_is_one_rule_relative_to_the_indexed_folder(indexed, tmp_path, monkeypatch):
    """Issue 22 item 3: a relative --under was read from the current directory in the
    CLI and from the indexed folder on the web; now from the indexed folder in both,
    whatever the current directory, and in the library too."""
    root, index_dir, _ = indexed
    query = str(root / "photos" / "a" / "img_001.jpg")
    monkeypatch.chdir(tmp_path)  # nowhere near the photos
    relative = query_json(query, "--index", str(index_dir), "-k", "3", "--under", "b")[0]["results"]
    assert len(relative) == 3 and all("/photos/b/" in h["path"] for h in relative)
    searcher = Searcher.open(index_dir)
    hits = searcher.search_ids([0], k=3, result_filter=ResultFilter.make(under="./b/../b"))[0]
    assert [h.path for h in hits] == [h["path"] for h in query_json("--id", "0", "--index", str(index_dir),
                                                                    "-k", "3", "--no-rerank",
                                                                    "--under", str(root / "photos" / "b"))[0]
                                      ["results"]]


@pytest.mark.parametrize("under", ["not-there", "../index", "/definitely/elsewhere"])
def test_under_outside_the_index_is_a_one_line_error(indexed, under):
    """It used to be exit 0, no results and a note."""
    root, index_dir, _ = indexed
    query = str(root / "photos" / "a" / "img_001.jpg")
    result = CliRunner().invoke(app, ["query", query, "--index", str(index_dir), "--under", under])
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no indexed image below this folder" in lines[0]
    assert str(root / "photos") in lines[0]
    with pytest.raises(CbirError, match="no indexed image below"):
        Searcher.open(index_dir).search_ids([0], k=3, result_filter=ResultFilter.make(under=under))


def test_min_score_keeps_only_scores_above_it(indexed):
    root, index_dir, _ = indexed
    query = str(root / "photos" / "a" / "img_001.jpg")
    plain = query_json(query, "--index", str(index_dir), "-k", "12", "--no-rerank")[0]["results"]
    cut = (plain[2]["score"] + plain[3]["score"]) / 2  # exactly three pass
    kept = query_json(query, "--index", str(index_dir), "-k", "10", "--min-score", f"{cut:.6f}",
                      "--no-rerank")[0]["results"]
    assert [h["id"] for h in kept] == [h["id"] for h in plain[:3]]
    # Re-ranked (the default): the same three, in the re-ranked order (whose scores,
    # cosines to the query, need not decrease: the cut cannot stop at the first low one).
    reranked = query_json(query, "--index", str(index_dir), "-k", "10", "--min-score", f"{cut:.6f}")[0]["results"]
    assert sorted(h["id"] for h in reranked) == sorted(h["id"] for h in plain[:3])
    assert all(h["score"] >= cut for h in reranked)


def random_backend(seed: int) -> tuple[FakeBackend, np.ndarray]:
    """400 random unit vectors in the numpy fake backend, and the first as a query."""
    x = np.random.default_rng(seed).standard_normal((400, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    backend = FakeBackend()
    backend.add(np.arange(400), x)
    return backend, x[:1]


def test_filtered_search_searches_deeper_until_k_results_qualify():
    """The allowed images are the ones ranked last: a top-k-then-filter search would
    return nothing; the filtered search deepens until it has k, and they are the
    exact top k among the allowed ones."""
    backend, query = random_backend(1)
    order = backend.search(query, 400)[1][0]
    allowed = np.sort(order[-20:])  # the 20 least similar
    depths = []

    def search(q, k):
        depths.append(k)
        return backend.search(q, k)

    _scores, ids = filtered_search(search, query, 5, 400, ResultFilter(under="/x"), allowed)
    assert ids[0].tolist() == [i for i in order if i in set(allowed.tolist())][:5]
    assert depths[-1] == 400 and len(depths) > 1
    # With a minimum score nothing deeper can pass once the list falls below it.
    depths.clear()
    _, ids = filtered_search(search, query, 5, 400, ResultFilter(min_score=0.99), None)
    assert ids[0].tolist() == [0, -1, -1, -1, -1] and depths == [5]


def test_a_re_ranked_list_is_cut_by_the_minimum_score_without_stopping_at_a_low_score():
    """A re-ranked list's scores (cosines to the query) need not decrease. Here the
    top five by cosine come in reverse order behind the rest: a cut that stops at the
    first score below the minimum would return none of them (what it did before
    the cut knew of re-ranking); told how many can pass, it searches deeper."""
    backend, query = random_backend(2)
    scores, order = backend.search(query, 400)
    minimum = float(scores[0, 4])  # exactly the top five pass
    reranked = np.concatenate([order[0, 5:], order[0, :5][::-1]])  # the passing ones ranked last
    cosine = dict(zip(order[0].tolist(), scores[0].tolist()))

    def search(q, k):
        ids = reranked[:k][None, :]
        return np.array([[cosine[i] for i in ids[0]]], dtype=np.float32), ids

    result = ResultFilter(min_score=minimum)
    short = filtered_search(search, query, 5, 400, result, None)[1]
    assert short[0].tolist() == [-1] * 5  # the last score of the first search is below the minimum
    counted = filtered_search(search, query, 5, 400, result, None,
                              lambda q: passing_counts(backend.range_search, q, minimum, None))[1]
    assert counted[0].tolist() == order[0, :5][::-1].tolist()  # in the re-ranked order
    assert passing_counts(backend.range_search, query, minimum, np.sort(order[0, :2])).tolist() == [2]


def test_report_and_grid_show_the_query_and_its_results(indexed, tmp_path):
    _root, index_dir, image = indexed
    report, grid = tmp_path / "report", tmp_path / "grid.png"
    result = CliRunner().invoke(app, ["query", str(image), "--box", "0.5,0,1,1", "--index", str(index_dir), "-k", "4",
                                      "--report", str(report), "--grid", str(grid)])
    assert result.exit_code == 0, result.output
    page = (report / "index.html").read_text()
    assert page.count("<figure") == 5 and "#1 " in page and "composite.png [0.5,0,1,1]" in page
    for name in (s.split("'")[0] for s in page.split("src='thumbs/")[1:]):
        assert (report / "thumbs" / name).is_file()
    from cbir_cli.imageio.thumbnails import CAPTION_HEIGHT, FRAME, GAP
    from cbir_cli.search.gallery import THUMB

    side = THUMB + 2 * FRAME
    for png in (grid, report / "results.png"):
        assert Image.open(png).size == (5 * side + 6 * GAP, side + CAPTION_HEIGHT + 2 * GAP)


# --------------------------------------------------------------------------- the API


@pytest.fixture(scope="module")
def client(indexed, tiny_embedder):
    from cbir_cli.serve.app import create_app

    return create_app(Searcher.open(indexed[1], embedder=tiny_embedder)).test_client()


def upload(client, image: Image.Image, **fields):
    data = io.BytesIO()
    image.save(data, "PNG")
    data.seek(0)
    return client.post("/api/search", data={"image": (data, "composite.png"), "k": "3", **fields},
                       content_type="multipart/form-data")


def test_api_box_under_and_min_score(client, indexed):
    answer = upload(client, composite(), box="0.5,0,1,1")
    assert answer.status_code == 200, answer.json
    assert answer.json["query"]["box"] == "0.5,0,1,1" and answer.json["results"][0]["name"] == "img_008.jpg"
    assert upload(client, composite(), box="0,0,160,120").json["results"][0]["name"] == "img_003.jpg"
    # under: relative to the indexed folder (or absolute); still k results.
    only_a = upload(client, composite(), box="0.5,0,1,1", under="a").json["results"]
    assert len(only_a) == 3 and all("/photos/a/" in h["path"] for h in only_a)
    outside = upload(client, composite(), under="../elsewhere")
    assert outside.status_code == 400 and "no indexed image below" in outside.json["error"]
    top = answer.json["results"][0]
    by_id = client.get(f"/api/search?id={top['id']}&k=5&min_score={top['score'] - 1e-3:.6f}&box=0,0,1,1")
    assert by_id.status_code == 200 and by_id.json["results"][0]["id"] == top["id"]
    assert all(h["score"] >= top["score"] - 1e-3 for h in by_id.json["results"])


@pytest.mark.parametrize(("fields", "fragment"), [
    ({"box": "1,2"}, "four numbers"), ({"min_score": "high"}, "min_score must be a number"),
    ({"min_score": "3"}, "in [-1, 1]"), ({"box": "0,0,4,4"}, "less than 8x8"),
])
def test_api_rejects_bad_narrowing_with_json_400(client, fields, fragment):
    answer = upload(client, composite(), **fields)
    assert answer.status_code == 400 and fragment in answer.json["error"]
