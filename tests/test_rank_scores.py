"""The score shown follows the order (issue 22 item 4): under re-ranking a result's
cosine can exceed the one above it; ``score`` never rises down the list, ``cosine``
keeps the plain one beside it, in the library, ``--json``, the table, the piped
lines and the web API; JSON numbers are rounded."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from test_server import build_index

from cbir_cli.search.scores import json_score, rank_scores
from cbir_cli.search.searcher import Hit, Searcher


@dataclass
class Reordered:
    """A backend whose results come in a re-ranked order: the raw top-1 kept first,
    the rest reversed, so their cosines rise down the list (as re-ranking can make
    them do); scores returned are the cosines, as RerankingBackend.search returns."""

    inner: Any

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def search(self, queries, k):
        scores, ids = self.inner.search(queries, k)
        return (np.concatenate([scores[:, :1], scores[:, 1:][:, ::-1]], axis=1),
                np.concatenate([ids[:, :1], ids[:, 1:][:, ::-1]], axis=1))


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, tiny_embedder):
    root = tmp_path_factory.mktemp("scores")
    build_index(root / "images", root / "index", tiny_embedder, 8)
    return root / "index"


@pytest.fixture
def reordered(index_dir, tiny_embedder) -> Searcher:
    searcher = Searcher.open(index_dir, embedder=tiny_embedder)
    searcher.backend = Reordered(searcher.backend)
    return searcher


def assert_follows_order(hits: list[dict]) -> None:
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True), scores
    assert all(h["score"] <= h["cosine"] + 1e-9 for h in hits)


def test_rank_scores_are_the_running_minimum():
    assert rank_scores([0.95, 0.898, 0.916, 0.89]) == [0.95, 0.898, 0.898, 0.89]
    assert rank_scores([0.9, 0.8, 0.7]) == [0.9, 0.8, 0.7]  # already in order: the cosines themselves
    assert rank_scores([]) == []


def test_a_reordered_list_gets_non_increasing_scores_with_the_cosine_beside(reordered):
    hits = reordered.search_ids([reordered.rows[2].id], k=6)[0]
    cosines = [h.cosine for h in hits]
    assert cosines[1] < cosines[-1]  # the order really is not the cosine order
    assert [h.score for h in hits] == rank_scores(cosines)
    assert hits[0].score == hits[0].cosine == pytest.approx(1.0, abs=1e-4)


def test_plain_order_score_equals_cosine(index_dir, tiny_embedder):
    searcher = Searcher.open(index_dir, embedder=tiny_embedder)
    hits = searcher.search_ids([searcher.rows[2].id], k=6)[0]
    assert [h.score for h in hits] == [h.cosine for h in hits]


def test_json_scores_are_rounded():
    hit = Hit(1, 1.0000004768371582, 7, "/x/a.jpg", 1.0000004768371582)
    assert hit.as_dict()["score"] == 1.0 and hit.as_dict()["cosine"] == 1.0
    assert json_score(0.91761234) == 0.9176
    assert json.dumps(Hit(2, 0.898123456, 8, "/x/b.jpg", 0.916987654).as_dict()).count("0.898") == 1


def test_the_web_api_shows_the_score_that_follows_the_order(reordered):
    from cbir_cli.serve.app import create_app

    client = create_app(reordered).test_client()
    body = client.get(f"/api/search?id={reordered.rows[2].id}&k=6").get_json()
    hits = body["results"]
    assert_follows_order(hits)
    assert any(h["cosine"] > h["score"] for h in hits)
    assert all(len(repr(h["score"]).split(".")[-1]) <= 4 for h in hits)  # rounded
    assert hits[1]["folder"].endswith("images") and hits[1]["name"].startswith("img_")


def query_output(monkeypatch, reordered, *args: str) -> str:
    from typer.testing import CliRunner

    from cbir_cli.cli import app

    monkeypatch.setattr(Searcher, "open", classmethod(lambda cls, *a, **kw: reordered))
    result = CliRunner().invoke(app, ["query", "--id", str(reordered.rows[2].id), "-k", "6", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_query_json_and_piped_lines_show_score_and_cosine(monkeypatch, reordered):
    hits = json.loads(query_output(monkeypatch, reordered, "--json"))[0]["results"]
    assert_follows_order(hits)
    assert any(h["cosine"] > h["score"] for h in hits)
    lines = [line.split("\t") for line in query_output(monkeypatch, reordered).splitlines()]
    scores = [float(f[2]) for f in lines]
    assert scores == sorted(scores, reverse=True)
    assert all(len(f) == 4 for f in lines) and lines[0][3].endswith("img_002.jpg")  # fields as before


def test_query_table_has_a_cosine_column_only_where_they_differ(monkeypatch, reordered, index_dir, tiny_embedder):
    import sys

    from cbir_cli.cli import searching
    from cbir_cli.search.gallery import QueryView
    from cbir_cli.search.queries import Answer

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    printed = []
    monkeypatch.setattr(searching, "stdout", lambda: type("C", (), {"print": lambda self, t: printed.append(t)})())
    hits = reordered.search_ids([reordered.rows[2].id], k=6)[0]
    searching._print_answers([Answer(QueryView("q"), hits)])
    table = printed[-1]
    assert [c.header for c in table.columns] == ["rank", "score", "cosine", "id", "path"]
    cells = table.columns[2]._cells
    assert cells[0] == "" and any(cells)  # blank where equal, shown where re-ranking lifted the hit
    plain = Searcher.open(index_dir, embedder=tiny_embedder).search_ids([reordered.rows[2].id], k=6)[0]
    searching._print_answers([Answer(QueryView("q"), plain)])
    assert [c.header for c in printed[-1].columns] == ["rank", "score", "id", "path"]
