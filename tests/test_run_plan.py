"""The run plan (cbir_cli.pipeline.run_plan): one place that settles every choice;
`cbir index --dry-run` shows it, and the run itself goes by it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cbir_cli.cli import app
from cbir_cli.errors import REMEDIES, CbirError
from cbir_cli.models.registry import DescriptorSettings
from cbir_cli.pipeline.options import ExtractOptions, IndexSettings
from cbir_cli.pipeline.run_plan import plan_run
from cbir_cli.resolve import ModelSettings

runner = CliRunner()


def dry_run(folder: Path, index_dir: Path, *extra: str) -> dict:
    result = runner.invoke(app, ["index", str(folder), "--index", str(index_dir), "--dry-run", "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_dry_run_prints_the_plan_writes_nothing_and_imports_no_torch(image_folder, tmp_path):
    folder = image_folder(2)
    index_dir = tmp_path / "idx"
    code = ("import sys, json; from typer.testing import CliRunner; from cbir_cli.cli import app; "
            f"r = CliRunner().invoke(app, ['index', {str(folder)!r}, '--index', {str(index_dir)!r}, "
            "'--model', 'test_tiny', '--index-type', 'hnsw', '--dry-run', '--json']); "
            "print(json.dumps({'code': r.exit_code, 'out': r.stdout, "
            "'heavy': [m for m in ('torch', 'torchvision', 'faiss', 'onnxruntime') if m in sys.modules]}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["code"] == 0, report
    assert report["heavy"] == []
    plan = json.loads(report["out"])
    assert (plan["model"], plan["index_type"], plan["backend"], plan["exists"]) == (
        "test_tiny", "hnsw", {"name": "faiss"}, False)
    assert (plan["device"], plan["runtime"], plan["precision"], plan["decode"], plan["executor"]) == (
        "cpu", "torch", "fp32", "cpu", "local")
    assert not index_dir.exists()  # no index, no manifest, not even the folder


def test_dry_run_text_names_every_choice(image_folder, tmp_path):
    result = runner.invoke(app, ["index", str(image_folder(1)), "--index", str(tmp_path / "idx"),
                                 "--model", "test_tiny", "--dry-run"])
    assert result.exit_code == 0, result.output
    for word in ("index", "model", "descriptor", "device", "runtime", "precision", "decode", "backend",
                 "index_type", "executor"):
        assert f"  {word} " in result.stdout
    assert not (tmp_path / "idx").exists()


def test_dry_run_of_an_existing_index_shows_what_it_keeps(image_folder, tmp_path, tiny_embedder):
    from cbir_cli import index_folder

    folder = image_folder(2)
    index_dir = tmp_path / "idx"
    index_folder(folder, index_dir, embedder=tiny_embedder, options=ExtractOptions(workers=0), index_type="flat")
    manifest = (index_dir / "manifest.json").read_bytes()
    plan = dry_run(folder, index_dir)  # no --model: the index's own
    assert (plan["model"], plan["exists"], plan["index_type"]) == ("test_tiny", True, "flat")
    assert (index_dir / "manifest.json").read_bytes() == manifest


def test_dry_run_refuses_what_the_run_would_refuse(image_folder, tmp_path):
    for extra, words in ((["--backend", "nope"], "unknown search backend 'nope'"),
                         (["--engine", "nope"], "unknown engine 'nope'"),
                         (["--model", "nope"], "nope")):
        result = runner.invoke(app, ["index", str(image_folder(1)), "--index", str(tmp_path / "idx"),
                                     "--dry-run", *extra])
        assert result.exit_code == 1 and words in result.output, result.output
    assert not (tmp_path / "idx").exists()


def test_cli_and_python_api_plan_alike(image_folder, tmp_path):
    folder = image_folder(1)
    index_dir = tmp_path / "idx"
    from_cli = dry_run(folder, index_dir, "--model", "test_tiny", "--pooling", "mac", "--index-type", "ivfpq",
                       "--precision", "fp32", "--runtime", "torch")
    from_python = plan_run(index_dir, ModelSettings("test_tiny", descriptor=DescriptorSettings("mac")),
                           ExtractOptions(precision="fp32", runtime="torch"), IndexSettings(index_type="ivfpq"))
    assert from_cli == from_python.as_dict()


def test_the_run_goes_by_the_plan(image_folder, tmp_path, monkeypatch):
    """index_folder embeds with what plan_run settled (model, descriptor, device,
    runtime), not with choices of its own."""
    import cbir_cli.pipeline.sync as sync

    folder = image_folder(2)
    plans = []
    real = sync.plan_run

    def spy(*args, **kwargs):
        plans.append(real(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(sync, "plan_run", spy)
    descriptor = DescriptorSettings("mac")
    sync.index_folder(folder, tmp_path / "idx", ModelSettings("test_tiny", descriptor=descriptor),
                      options=ExtractOptions(workers=0))
    (plan,) = plans
    assert (plan.model, plan.descriptor, plan.device) == ("test_tiny", descriptor, "cpu")
    from cbir_cli.store.feature_store import FeatureStore

    stored = FeatureStore.open(tmp_path / "idx").fingerprint
    assert stored["model"] == "test_tiny" and stored["descriptor"] == descriptor.fingerprint()


def test_int8_plan_runs_on_the_cpu_with_onnx():
    pytest.importorskip("onnxruntime")
    plan = plan_run("/nonexistent/idx", ModelSettings("test_tiny"), ExtractOptions(precision="int8"),
                    existing=None)
    assert (plan.precision, plan.device, plan.runtime) == ("int8", "cpu", "onnx")


def test_another_engine_settles_device_on_its_workers():
    plan = plan_run("/nonexistent/idx", ModelSettings("test_tiny"), ExtractOptions(), engine="ray", existing=None)
    assert (plan.device, plan.runtime, plan.decode, plan.executor) == ("auto", "auto", "auto", "ray")


def test_every_remedy_key_has_one_text_for_the_library_and_one_for_the_cli():
    import re

    from cbir_cli import errors
    from cbir_cli.errors import remedy_text

    src = Path(errors.__file__).parent
    used = {m for path in src.rglob("*.py") for m in re.findall(r'remedy\s*=\s*"([a-z-]+)"', path.read_text())}
    classes = [CbirError, *CbirError.__subclasses__()]
    used |= {cls.remedy for cls in classes if cls.remedy}
    assert used and used <= set(REMEDIES)
    for key, remedy in REMEDIES.items():
        assert remedy.library and remedy.cli and remedy.library != remedy.cli, key
        assert remedy_text(key) == remedy.library and remedy_text(key, cli=True) == remedy.cli
    assert str(CbirError("gone", remedy="build")) == f"gone; {REMEDIES['build'].library}"


def test_cli_error_line_uses_the_cli_wording():
    from cbir_cli.cli.common import error_line

    assert error_line(CbirError("no index", remedy="build")) == f"no index; {REMEDIES['build'].cli}"


def test_extract_folder_is_its_own_function():
    from cbir_cli import extract_folder
    from cbir_cli.pipeline.sync import sync_folder

    assert extract_folder is not sync_folder and "cbir extract" in (extract_folder.__doc__ or "")
