"""docs/extending.md says how to write a model-family and a backend plugin; these
tests hold it to that: a plugin made as the page says (the test plugin copied and
renamed) works by its new names from the CLI, the page's entry-point declaration is
the test plugin's, and the page names every member of each Protocol and the file
of every helper it points to (issue 23)."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cbir_cli.cli import app
from cbir_cli.models.family import ModelFamily
from cbir_cli.models.protocol import Embedder
from cbir_cli.pipeline.executor import Executor, ExecutorType
from cbir_cli.search.backends import BackendType
from cbir_cli.search.protocol import SearchBackend

REPO = Path(__file__).resolve().parents[1]
PAGE = (REPO / "docs" / "extending.md").read_text()
PLUGIN = REPO / "tests" / "plugins" / "cbir_fake_plugin"
runner = CliRunner()


def entry_points(text: str) -> dict[str, dict[str, str]]:
    """``[project.entry-points."GROUP"]`` tables -> {group: {name: value}} (comments dropped)."""
    found: dict[str, dict[str, str]] = {}
    group = None
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        header = re.fullmatch(r'\[project\.entry-points\."([\w.]+)"\]', line)
        if header:
            group = found.setdefault(header[1], {})
            continue
        entry = re.fullmatch(r'([\w.-]+)\s*=\s*"([^"]+)"', line)
        if group is not None and entry:
            group[entry[1]] = entry[2]
        else:
            group = None  # a table ends at anything but its entries
    return found


def test_the_pages_declarations_are_the_test_plugins_and_an_engines() -> None:
    declared = entry_points(PAGE)
    plugin = entry_points((PLUGIN / "pyproject.toml").read_text())
    assert {g: declared[g] for g in plugin} == plugin
    assert set(declared) == {"cbir_cli.models", "cbir_cli.backends", "cbir_cli.executors"}


@pytest.mark.parametrize("protocol", [ModelFamily, Embedder, BackendType, SearchBackend, ExecutorType, Executor])
def test_the_page_names_every_member_of_each_protocol(protocol: type) -> None:
    members = {n for n in vars(protocol) if not n.startswith("_")} | set(getattr(protocol, "__annotations__", {}))
    assert members
    missing = sorted(m for m in members if f"`{m}" not in PAGE)
    assert not missing, f"docs/extending.md does not name {protocol.__name__}'s {missing}"


# (module, name) the page points a plugin author to, each with its file.
HELPERS = [("cbir_cli.models.protocol", "EmbedderBase"), ("cbir_cli.models.protocol", "model_fingerprint_of"),
           ("cbir_cli.models.registry", "ModelConfig"), ("cbir_cli.errors", "CbirError"),
           ("cbir_cli.search.backends", "InFolderBackendType"), ("cbir_cli.search.protocol", "BackendBase"),
           ("cbir_cli.search.protocol", "BackendCheck"), ("cbir_cli.search.range", "pack_ranges"),
           ("cbir_cli.models.family", "ModelFamily"), ("cbir_cli.search.backends", "BackendType"),
           ("cbir_cli.pipeline.executor", "ExecutorType"), ("cbir_cli.plugins", "Registry")]


@pytest.mark.parametrize(("module", "name"), HELPERS)
def test_each_helper_the_page_names_is_in_the_file_it_names(module: str, name: str) -> None:
    assert hasattr(importlib.import_module(module), name)
    path = "src/" + module.replace(".", "/") + ".py"
    assert f"`{name}" in PAGE and f"`{path}`" in PAGE, (name, path)


@pytest.fixture(scope="module")
def hello_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test plugin copied and renamed as the page says (package, entry points,
    family and backend names), pip-installed into a folder on sys.path."""
    source = tmp_path_factory.mktemp("hello-source") / "cbir_hello_plugin"
    shutil.copytree(PLUGIN, source)
    (source / "cbir_fake_plugin").rename(source / "cbir_hello_plugin")
    for path in (source / "pyproject.toml", source / "cbir_hello_plugin" / "__init__.py"):
        path.write_text(path.read_text().replace("fake", "hello"))
    site = tmp_path_factory.mktemp("hello-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--no-build-isolation", "--target", str(site), str(source)], check=True, capture_output=True)
    sys.path.insert(0, str(site))
    yield site
    sys.path.remove(str(site))


def run_json(args: list[str]) -> object:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_a_plugin_made_as_the_page_says_works_by_its_names(hello_plugin, image_folder, index_env) -> None:
    rows = run_json(["models", "--json"])
    assert {"hello:tiny", "hello:small"} <= {r["name"] for r in rows}
    folder = image_folder(4)
    summary = run_json(["index", str(folder), "--model", "hello:tiny", "--backend", "hellobackend",
                        "--workers", "0", "--json"])
    assert summary["added"] == 4
    manifest = json.loads((index_env / "manifest.json").read_text())
    assert manifest["search_backend"] == {"name": "hellobackend"}
    assert (manifest["fingerprint"]["model"], manifest["fingerprint"]["family"]) == ("hello:tiny", "hello")
    first = sorted(folder.iterdir())[0]
    (answer,) = run_json(["query", str(first), "-k", "2", "--json", "--no-rerank"])
    assert Path(answer["results"][0]["path"]).name == first.name
    assert answer["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
