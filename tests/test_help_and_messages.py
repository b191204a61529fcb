"""`--help` and messages as a newcomer reads them (issue 22 item 6): one usage
convention, no Python type names, every command's summary whole in `cbir --help`,
long option lists grouped, options shared by `index` and `extract` worded once;
`index --rebuild-backend --json` prints its JSON; a missing Stanford Online
Products says where it comes from; the offline-weights error reads as one line."""

from __future__ import annotations

import json
import re

import pytest
import typer
from typer.testing import CliRunner

from cbir_cli.cli import app, error_line
from cbir_cli.errors import CbirError
from cbir_cli.models.registry import get_model_config
from cbir_cli.pipeline.options import ExtractOptions
from cbir_cli.pipeline.sync import index_folder

runner = CliRunner()
COMMANDS = [["index"], ["extract"], ["check"], ["query"], ["serve"], ["dedup"], ["models"], ["evaluate"],
            ["weights", "install"], ["weights", "path"]]


def help_of(*command: str) -> str:
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"}, terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


def flat(text: str) -> str:
    """The help without rich's box drawing and line breaks."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def click_command(*command: str):
    cmd = typer.main.get_command(app)
    for name in command:
        cmd = cmd.commands[name]
    return cmd


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_has_one_usage_convention_and_no_python_type_names(command):
    text = help_of(*command)
    usage = next(line for line in text.splitlines() if "Usage:" in line).split("Usage:")[1].split()
    arguments = [piece for piece in usage[2 + len(command) - 1:] if piece != "[OPTIONS]"]
    # Arguments in capitals; a required one plain, an optional one in brackets, never in braces.
    assert all(re.fullmatch(r"\[?[A-Z]+\]?(\.\.\.)?", piece) for piece in arguments), usage
    for leak in ("<list[", "<bool>", "{"):
        assert leak not in text, (leak, text)


def test_index_and_extract_usage_lines_agree():
    assert "Usage: cbir index [OPTIONS] [FOLDER]" in help_of("index")
    assert "Usage: cbir extract [OPTIONS] FOLDER" in help_of("extract")
    assert "Usage: cbir query [OPTIONS] [IMAGE]..." in help_of("query")


def test_the_command_list_shows_every_summary_whole():
    text = flat(help_of())
    for name, cmd in click_command().commands.items():
        summary = " ".join((cmd.help or "").split("\n\n")[0].split())
        assert f"{name} {summary}" in text, name
    assert "..." not in text.replace("COMMAND [ARGS]...", "")


def test_a_commands_description_is_reflowed_not_broken_where_the_source_wraps():
    # The docstring wraps under 100 characters; 200 columns of help hold far longer lines.
    first = next(line.strip() for line in help_of("query").splitlines() if "Queries: image files" in line)
    assert len(first) > 120, first


def test_a_usage_error_stays_one_plain_line_while_help_has_panels():
    result = runner.invoke(app, ["query", "photo.jpg", "-k", "0"], terminal_width=80)
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.strip()]
    assert errors[-1].startswith("Error: Invalid value for '-k'") and "1" in errors[-1]
    assert not re.search(r"[│╭╮╰╯]", result.output)


def test_long_option_lists_are_grouped_into_panels():
    index_help = help_of("index")
    for panel in ("Model and descriptor", "Re-ranking", "Speed and storage", "Scaling out (Ray, Milvus)"):
        assert f"─ {panel} ─" in index_help
    assert "pip install 'cbir-cli[ray]'" in flat(index_help)  # a literal [ survives rich markup


def test_options_shared_by_index_and_extract_are_worded_once():
    index = {p.name: p for p in click_command("index").params}
    extract = {p.name: p for p in click_command("extract").params}
    shared = sorted(set(index) & set(extract) - {"help"})
    assert {"folder", "model", "weights", "batch_size", "pooling", "engine"} <= set(shared)
    for name in shared:
        assert (index[name].help, index[name].metavar) == (extract[name].help, extract[name].metavar), name


def test_rerank_and_threshold_help_say_what_they_should():
    evaluate_rerank = next(p for p in click_command("evaluate").params if p.name == "rerank")
    assert "index's" not in evaluate_rerank.help
    threshold = next(p for p in click_command("dedup").params if p.name == "threshold")
    sentences = [s for s in re.split(r"(?<=\.)\s+", threshold.help.strip()) if s]
    assert len(sentences) == 1 and "F1" not in threshold.help


def test_rebuild_backend_with_json_prints_json(image_folder, tmp_path, tiny_embedder):
    target = tmp_path / "index"
    index_folder(image_folder(3), target, options=ExtractOptions(workers=0), embedder=tiny_embedder)
    result = runner.invoke(app, ["index", "--rebuild-backend", "--index", str(target), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload == {"index": str(target), "rebuilt_backend": True, "store_count": 3, "backend": "faiss"}


def test_missing_sop_says_where_it_comes_from_and_its_layout(tmp_path):
    for root in (tmp_path, tmp_path / "nowhere"):
        result = runner.invoke(app, ["evaluate", "--dataset", "sop", "--root", str(root)])
        assert result.exit_code == 1
        line = flat(result.stderr)
        assert line.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
        for fact in ("Stanford Online Products", "cvgl.stanford.edu", "Ebay_test.txt",
                     "image_id class_id super_class_id path"):
            assert fact in line, (fact, line)


@pytest.mark.parametrize("model", ["resnet50", "mobilenet_v2"])
def test_the_offline_weights_error_is_one_well_formed_line(model):
    from cbir_cli.models.weights import _offline_message

    line = error_line(CbirError(_offline_message(get_model_config(model), "no network"), remedy="weights-file"))
    assert "\n" not in line and ".;" not in line and "\\" not in line
    assert line.endswith("; or pass a local state dict with --weights FILE")
    assert "cbir weights install mobilenet_v2" in line
