"""``cbir serve`` opens its index through the run plan (pipeline/run_plan.py), as
``cbir index`` and ``cbir evaluate`` decide their settings, and shows it: ``cbir
serve --dry-run`` prints it without loading a model, ``/api/health`` reports it."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from cbir_cli.cli import app as cli_app
from cbir_cli.pipeline.sync import index_folder
from cbir_cli.serve.app import create_app

runner = CliRunner()


def test_serve_dry_run_prints_the_plan_and_serves_nothing(tmp_path, image_folder, tiny_embedder, monkeypatch):
    index_folder(image_folder(3), tmp_path / "idx", embedder=tiny_embedder)
    monkeypatch.setattr("cbir_cli.serve.app.create_app", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    result = runner.invoke(cli_app, ["serve", "--index", str(tmp_path / "idx"), "--dry-run", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    lines = dict(line.split(None, 1) for line in result.stdout.splitlines()[1:])
    assert lines["index"] == str(tmp_path / "idx") and lines["model"] == "test_tiny"
    assert lines["device"] == "cpu" and lines["runtime"] in ("torch", "onnx") and lines["exists"] == "yes"


def test_serve_dry_run_without_an_index_is_one_line_error(tmp_path):
    result = runner.invoke(cli_app, ["serve", "--index", str(tmp_path / "none"), "--dry-run"])
    assert result.exit_code != 0
    assert "no index here" in result.output and "Traceback" not in result.output


def test_the_server_opens_the_index_by_its_plan_and_reports_it(tmp_path, image_folder, tiny_embedder, monkeypatch):
    index_folder(image_folder(3), tmp_path / "idx", embedder=tiny_embedder)
    opened = {}

    def open_spy(index_dir=None, device="auto", runtime="auto", **kwargs):
        opened.update(index_dir=index_dir, device=device, runtime=runtime)
        return real_open(index_dir, device=device, runtime=runtime, embedder=tiny_embedder, **kwargs)

    from cbir_cli.search.searcher import Searcher

    real_open = Searcher.open
    monkeypatch.setattr(Searcher, "open", staticmethod(open_spy))
    client = create_app(index_dir=tmp_path / "idx").test_client()
    # The plan settled "auto" before the index was opened, as `cbir index` would.
    assert opened["index_dir"] == tmp_path / "idx"
    assert opened["device"] in ("cpu", "cuda", "mps") and opened["runtime"] in ("torch", "onnx")
    plan = client.get("/api/health").get_json()["plan"]
    assert plan["index"] == str(tmp_path / "idx") and plan["model"] == "test_tiny"
    assert (plan["device"], plan["runtime"]) == (opened["device"], opened["runtime"])
    json.dumps(plan)
