"""The README and the docs pages do not drift from the code (issue 22 item 8, issue
23 item 3): every ``cbir ...`` command line they show names a real command and only
that command's options, every ``--option`` they name exists (in the CLI, or in the
bench script it is given to, named as ``bench/x.py`` or ``python -m bench.x``), and
the ``dedup --csv`` columns they list are the real header."""

from __future__ import annotations

import csv
import io
import re
from functools import cache
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cbir_cli.cli import app
from cbir_cli.pipeline.options import ExtractOptions
from cbir_cli.pipeline.sync import index_folder

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
# The README and every page of the docs site, by name relative to the repository.
PAGES = {str(p.relative_to(REPO)): p.read_text(encoding="utf-8")
         for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]}
OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-zA-Z])\b")
# A command line ends at a comment, a pipe, a redirection or a sentence.
END_OF_COMMAND = re.compile(r"\s#|\s\|\s|\s>\s|;|&&|\bcbir |\. ")
OTHER_TOOLS = ("pip ", "ray ", "pytest", "curl ", "python -m pytest", "git ", "docker ", "nvidia-smi", "lint-imports",
               "ruff ", "uv ", "helm ", "kubectl ", "mkdocs ")


def code_segments(text: str = README) -> list[str]:
    """Inline code of the prose (possibly wrapped over lines of one paragraph) and the
    lines of indented code blocks (a YAML list item's ``- `` dropped)."""
    lines = text.splitlines()
    prose = "\n".join(line if not line.startswith("    ") else "" for line in lines)
    spans = [" ".join(s.split()) for paragraph in prose.split("\n\n") for s in re.findall(r"`([^`]+)`", paragraph)]
    return spans + [line.strip().removeprefix("- ") for line in lines if line.startswith("    ")]


@cache
def cli_options() -> dict[str, set[str]]:
    """Every command ("weights install" for a sub-command) -> its option strings."""
    def options(cmd) -> set[str]:
        out = {"--help"}
        for param in cmd.params:
            out |= set(getattr(param, "opts", ())) | set(getattr(param, "secondary_opts", ()))
        return {o for o in out if o.startswith("-")}

    commands: dict[str, set[str]] = {}
    for name, cmd in typer.main.get_command(app).commands.items():
        if hasattr(cmd, "commands"):
            commands |= {f"{name} {sub}": options(c) for sub, c in cmd.commands.items()}
        else:
            commands[name] = options(cmd)
    return commands


@cache
def bench_options(script: str) -> set[str]:
    return set(re.findall(r'add_argument\(\s*"(--[a-z0-9-]+)"', (REPO / "bench" / script).read_text()))


def cbir_command_lines(text: str = README) -> list[tuple[str, str, str]]:
    """(command, the rest of its line, the code it came from) for every ``cbir ...`` shown."""
    found = []
    for segment in code_segments(text):
        for match in re.finditer(r"(?:^|[\s($])cbir ([a-z][a-z-]*)(?: ([a-z]+))?", segment):
            name = f"weights {match[2]}" if match[1] == "weights" else match[1]
            rest = END_OF_COMMAND.split(segment[match.end():], maxsplit=1)[0]
            found.append((name, rest, segment))
    return found


def test_the_readme_shows_commands_at_all():
    names = {name for name, _, _ in cbir_command_lines()}
    assert {"index", "query", "serve", "dedup", "evaluate", "check", "extract", "weights install"} <= names


@pytest.mark.parametrize("page", PAGES)
def test_every_cbir_command_line_names_a_real_command_and_its_options(page):
    problems = []
    for name, rest, segment in cbir_command_lines(PAGES[page]):
        if name not in cli_options():
            problems.append(f"no command `cbir {name}`: {segment}")
            continue
        problems += [f"`cbir {name}` has no {opt}: {segment}" for opt in OPTION.findall(rest)
                     if opt not in cli_options()[name]]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES)
def test_every_option_the_page_names_exists(page):
    everything = set().union(*cli_options().values())
    scripts = {p.name for p in (REPO / "bench").glob("*.py")}
    every_bench = set().union(*(bench_options(s) for s in scripts))
    problems = []
    for segment in code_segments(PAGES[page]):
        # A bench named by path (`bench/query.py`) or as a module (`python -m bench.query`).
        named = re.search(r"\bbench(/|\.)(\w+)(\.py)?\b", segment)
        script = f"{named[2]}.py" if named and (named[1] == "." or named[3]) else None
        if script and script not in scripts:
            problems.append(f"no bench script bench/{script}: {segment}")
        elif script:
            unknown = [o for o in OPTION.findall(segment.split("#")[0]) if o.startswith("--")
                       and o not in bench_options(script) and o not in everything]
            problems += [f"bench/{script} has no {o}: {segment}" for o in unknown]
        elif not segment.startswith(OTHER_TOOLS) and "cbir " not in segment:
            # Prose: `--rerank` names an option of some command (or of a bench script).
            problems += [f"no option {o}: {segment}" for o in OPTION.findall(segment)
                         if o.startswith("--") and o not in everything | every_bench]
    assert not problems, "\n".join(problems)


def test_the_docs_site_has_every_page_and_the_pages_in_its_nav():
    nav = re.findall(r":\s*([\w-]+\.md)\s*$", (REPO / "mkdocs.yml").read_text(encoding="utf-8"), re.M)
    pages = sorted(p.name for p in (REPO / "docs").glob("*.md"))
    assert sorted(nav) == pages
    for name in ("usage", "search-and-filters", "search-by-words", "web", "duplicates", "evaluation", "performance",
                 "scaling-out", "reliability", "architecture", "extending", "changelog", "api"):
        assert f"{name}.md" in pages


def test_the_readme_is_short_and_links_every_docs_page():
    assert len(README.splitlines()) <= 250
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)", README))
    # mkdocs --strict checks the links between pages; the README is outside the site.
    assert all((REPO / "docs" / name).is_file() for name in linked), linked
    assert linked >= {p.name for p in (REPO / "docs").glob("*.md")} - {"index.md"}


def test_the_dedup_csv_columns_the_docs_list_are_the_real_header(image_folder, tmp_path, tiny_embedder):
    listed = re.search(r"cbir dedup --csv .*# one row per image: (.+)", "\n".join(PAGES.values()))
    assert listed, "the docs show `cbir dedup --csv` with its columns"
    columns = [c.strip() for c in listed[1].split(",")]
    target = tmp_path / "index"
    index_folder(image_folder(2), target, options=ExtractOptions(workers=0), embedder=tiny_embedder)
    result = CliRunner().invoke(app, ["dedup", "--csv", "--threshold", "0.99", "--index", str(target)])
    assert result.exit_code == 0, result.output
    header = next(csv.reader(io.StringIO(result.stdout)))
    assert columns == header
