"""Open registries: a plugin package (tests/plugins/cbir_fake_plugin) adds a model
family and a search backend by entry point, and the CLI uses both by name.

The plugin is pip-installed once per session with ``--target`` into a temporary
folder put on ``sys.path`` (and on PYTHONPATH for the subprocesses): the test
suite needs no step of its own in ``.ci/run``, runs offline (``--no-index
--no-build-isolation``: the environment's setuptools builds it) and leaves the
environment as it found it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import cbir_cli
from cbir_cli.cli import app
from cbir_cli.errors import CbirError
from cbir_cli.models.family import MODEL_FAMILIES, ModelFamily
from cbir_cli.plugins import Registry
from cbir_cli.search.backends import BACKEND_TYPES, BackendType
from cbir_cli.search.protocol import SearchBackend

PLUGIN = Path(__file__).parent / "plugins" / "cbir_fake_plugin"
runner = CliRunner()


@pytest.fixture(scope="session")
def fake_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plugin installed (as a wheel: its entry points in a dist-info) into a
    folder on sys.path; returns the folder."""
    source = tmp_path_factory.mktemp("plugin-source") / "cbir_fake_plugin"
    shutil.copytree(PLUGIN, source)  # the build writes build/ and *.egg-info next to it, not into tests/
    site = tmp_path_factory.mktemp("plugin-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--no-build-isolation", "--target", str(site), str(source)], check=True, capture_output=True)
    sys.path.insert(0, str(site))
    yield site
    sys.path.remove(str(site))


def cli_env(site: Path) -> dict[str, str]:
    src = Path(cbir_cli.__file__).parent.parent
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(src)])}


def run_json(args: list[str]) -> object:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_cbir_models_lists_the_plugins_family_backend_and_the_builtins(fake_plugin):
    listed = subprocess.run([sys.executable, "-m", "cbir_cli", "models"], env=cli_env(fake_plugin),
                            capture_output=True, text=True, check=True).stdout
    assert "fake:tiny" in listed and "fake:small" in listed and "resnet50" in listed
    assert "search backends (--backend): faiss, milvus, fakebackend" in listed
    assert "engines (--engine): local, ray" in listed
    rows = run_json(["models", "--json"])
    fake = next(r for r in rows if r["name"] == "fake:tiny")
    assert (fake["family"], fake["dim"], fake["has_text"]) == ("fake", 16, False)
    assert next(r for r in rows if r["name"] == "resnet50")["family"] == "cnn"


def test_index_and_query_with_the_plugins_model_and_backend_by_name(fake_plugin, image_folder, index_env):
    folder = image_folder(6)
    summary = run_json(["index", str(folder), "--model", "fake:tiny", "--backend", "fakebackend",
                        "--workers", "0", "--json"])
    assert summary["added"] == 6
    manifest = json.loads((index_env / "manifest.json").read_text())
    assert manifest["search_backend"] == {"name": "fakebackend"}
    assert (manifest["fingerprint"]["model"], manifest["fingerprint"]["family"]) == ("fake:tiny", "fake")

    images = sorted(folder.iterdir())
    (answer,) = run_json(["query", str(images[2]), "-k", "3", "--json", "--no-rerank"])
    hits = answer["results"]
    # The plugin's vectors, recomputed here: the image itself first, scores in order.
    from PIL import Image

    embedder = MODEL_FAMILIES.get("fake").load("tiny", None, "cpu", "auto", None, None)
    gallery = embedder.embed([embedder.preprocess(Image.open(p)) for p in images])
    expected = np.argsort(-(gallery @ gallery[2]), kind="stable")[:3]
    assert [Path(h["path"]).name for h in hits] == [images[i].name for i in expected]
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-5)

    # Growing the index keeps the recorded model and backend without naming them.
    (folder / "extra").mkdir()
    Image.open(images[0]).rotate(90).save(folder / "extra" / "turned.png")
    assert run_json(["index", str(folder), "--workers", "0", "--json"])["added"] == 1
    assert json.loads((index_env / "manifest.json").read_text())["search_backend"] == {"name": "fakebackend"}
    check = runner.invoke(app, ["check"])
    assert check.exit_code == 0 and "fakebackend keeps nothing on disk" in check.output, check.output


def test_a_cnn_option_on_a_plugin_model_and_unknown_names_are_one_line_errors(fake_plugin, image_folder,
                                                                                index_env):
    folder = image_folder(2)
    for args, message in (
        (["--model", "fake:tiny", "--pooling", "mac"], "--pooling, --input and --scales pool a CNN's feature map"),
        (["--model", "fake:huge"], "unknown model fake:huge; choose one of: fake:tiny, fake:small"),
        (["--model", "nofamily:x"], "unknown model family 'nofamily'; choose one of: cnn, clip, fake"),
        (["--model", "fake:tiny", "--backend", "nope"], "unknown search backend 'nope'; choose one of: faiss, "
                                                        "milvus, fakebackend"),
        (["--model", "fake:tiny", "--engine", "nope"], "unknown engine 'nope'; choose one of: local, ray"),
        (["--model", "fake:tiny", "--backend", "faiss", "--backend-uri", "x.db"], "faiss keeps its index"),
    ):
        result = runner.invoke(app, ["index", str(folder), "--workers", "0", *args])
        assert result.exit_code != 0 and message in result.output, (args, result.output)
        assert "Traceback" not in result.output


def test_the_milvus_option_names_are_hidden_aliases_of_the_generic_ones():
    help_text = runner.invoke(app, ["index", "--help"], terminal_width=200).output
    assert "--backend-uri" in help_text and "--backend-collection" in help_text
    assert "--milvus-uri" not in help_text and "--milvus-collection" not in help_text
    from cbir_cli.cli.scaling import backend_choice

    spec = backend_choice("milvus", None, None, "a.db", "c")
    assert (spec.name, spec.uri, spec.collection) == ("milvus", "a.db", "c")
    result = runner.invoke(app, ["index", "x", "--backend", "milvus", "--backend-uri", "a.db", "--milvus-uri", "b.db"])
    assert result.exit_code != 0 and "say different things" in result.output


def test_every_registered_object_implements_its_protocol(fake_plugin):
    from cbir_cli.pipeline.executor import EXECUTOR_TYPES, ExecutorType
    from cbir_cli.search.faiss_backend import FaissBackend
    from cbir_cli.search.milvus_backend import MilvusBackend
    from cbir_cli.search.rerank import RerankingBackend

    for name in MODEL_FAMILIES.names():
        assert isinstance(MODEL_FAMILIES.get(name), ModelFamily), name
    for name in BACKEND_TYPES.names():
        assert isinstance(BACKEND_TYPES.get(name), BackendType), name
    for name in EXECUTOR_TYPES.names():
        assert isinstance(EXECUTOR_TYPES.get(name), ExecutorType), name
    # What callers use of a backend (check_target, read_meta, close) is in the protocol.
    for backend in (FaissBackend(), BACKEND_TYPES.get("fakebackend").open(None, Path(".")),
                    RerankingBackend(FaissBackend())):
        assert isinstance(backend, SearchBackend), backend
    assert all(hasattr(MilvusBackend, m) for m in ("check_target", "read_meta", "close"))


def test_a_broken_plugin_fails_only_where_used_with_one_line():
    registry: Registry[object] = Registry("cbir_cli.test_nothing", "widget", {"ok": "json:dumps",
                                                                              "broken": "no_such_module_x:thing"})
    assert registry.names() == ("ok", "broken")  # listing imports nothing
    assert registry.get("ok") is json.dumps
    with pytest.raises(CbirError, match=r"the widget 'broken' \(no_such_module_x:thing\) cannot be loaded: "
                                        r"ModuleNotFoundError"):
        registry.get("broken")
    registry.register("mine", 1)
    assert registry.get("mine") == 1 and "mine" in registry.names()
    with pytest.raises(ValueError):
        registry.register("ok", 2)
