"""`cbir query` with some bad query files (issue 22, items 5 and 10): the good ones
are answered, each bad one gets one warning line, the exit is non-zero at the end;
and a file that cannot be opened is named before the model loads."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cbir_cli.cli import app

runner = CliRunner()


@pytest.fixture
def indexed(image_folder, index_env):
    folder = image_folder(6)
    result = runner.invoke(app, ["index", str(folder), "--model", "test_tiny", "--workers", "0"])
    assert result.exit_code == 0, result.output
    return folder


def test_good_queries_are_answered_and_each_bad_one_warned(indexed, tmp_path):
    good = sorted(indexed.glob("*.jpg"))[:2]
    missing, text = tmp_path / "missing.jpg", tmp_path / "notes.jpg"
    text.write_text("not a picture")
    result = runner.invoke(app, ["query", str(good[0]), str(missing), str(text), str(good[1]), "-k", "1", "--json"])
    assert result.exit_code != 0
    answers = json.loads(result.stdout)
    assert [a["query"] for a in answers] == [str(good[0]), str(good[1])]
    assert [a["results"][0]["path"] for a in answers] == [str(good[0]), str(good[1])]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2
    assert str(missing) in warnings[0] and str(text) in warnings[1]
    assert "2 of 4 query images could not be read" in result.stderr


def test_a_missing_query_file_is_named_before_the_model_loads(indexed, tmp_path, monkeypatch):
    def no_model(*_args, **_kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("cbir_cli.models.loading.load_embedder", no_model)
    missing = tmp_path / "missing.jpg"
    result = runner.invoke(app, ["query", str(missing), "--runtime", "torch"])
    assert result.exit_code == 1
    assert str(missing) in result.stderr and "the model was loaded" not in result.output
