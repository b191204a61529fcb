"""The benchmark tables in the docs, generated from the result files the benches write.

    python -m bench.tables            # rewrite the generated tables in docs/*.md
    python -m bench.tables --check    # exit 1 (naming the pages) where a table differs

A docs page asks for a table with two markers naming a result file in
``bench/results/`` (its file name without ``.json``)::

    <!-- bench:rerun-20261206-211500 -->
    <!-- /bench:rerun-20261206-211500 -->

Everything between the markers is replaced by a line naming the run (command,
machine, load, date, result file) and the markdown table of the result's
``figures["table"]`` (a list of rows, each a dict of column -> value; see
:func:`bench.harness.write_result`). A marker names one file, not "the latest run",
so a page changes only when someone points it at a new run; and
``tests/test_bench_tables.py`` checks the committed pages against the committed
result files, so a figure cannot drift from the run that printed it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py`: see bench/harness.py
from bench.harness import REPO, RESULTS

DOCS = REPO / "docs"
MARKERS = re.compile(r"<!-- bench:(?P<name>[\w.-]+) -->\n(?P<body>.*?)<!-- /bench:(?P=name) -->", re.DOTALL)


class ResultError(Exception):
    """A marker names a result file that is missing or has no table."""


def load_result(name: str, results: Path = RESULTS) -> dict[str, Any]:
    """The result file ``results/<name>.json``, which must hold ``figures["table"]``.

    Args:
        name: the file name without ``.json`` (as the docs' marker gives it).
        results: the folder of result files.

    Returns:
        The result record (``command``, ``machine``, ``load``, ``figures``, ...).

    Raises:
        ResultError: the file is missing, not JSON, or has no table.
    """
    path = results / f"{name}.json"
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultError(f"{path}: no such result file (named by a <!-- bench:{name} --> marker)") from None
    except json.JSONDecodeError as exc:
        raise ResultError(f"{path}: not JSON ({exc})") from None
    figures = record.get("figures")
    if not isinstance(figures, dict) or not isinstance(figures.get("table"), list) or not figures["table"]:
        raise ResultError(f"{path}: no figures['table'] to render")
    return record


def cell(value: Any) -> str:
    """One table cell: text as written, integers with thousands separators, floats to
    four significant figures at most, whole above 1,000 (a bench rounds what it means
    to show: 0.1 stays 0.1)."""
    if isinstance(value, bool) or value is None:
        text = "-" if value is None else str(value).lower()
    elif isinstance(value, int):
        text = f"{value:,}"
    elif isinstance(value, float):
        text = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    else:
        text = str(value)
    return text.replace("|", "\\|")


def provenance(name: str, record: dict[str, Any]) -> str:
    """The line naming the run: command, machine, load, date and result file."""
    machine = record.get("machine") or {}
    cores = machine.get("cpus")
    where = f"{cores} cores ({machine.get('cpu_model', 'CPU unknown')})" if cores else "machine not recorded"
    load = record.get("load") or record.get("load_average_end")
    load_text = "load " + " / ".join(f"{v:.1f}" for v in load) if load else "load not recorded"
    stamp = re.search(r"(\d{4})(\d{2})(\d{2})", name)
    date = record.get("date") or (f"{stamp[1]}-{stamp[2]}-{stamp[3]}" if stamp else "date not recorded")
    commit = (record.get("versions") or {}).get("commit")
    at = f", commit {commit[:7]}" if commit else ""
    return (f"Printed by `{record.get('command', '?')}` on {where}, {load_text} (1/5/15 min), {date}{at}; "
            f"result file `bench/results/{name}.json`.")


def render(name: str, record: dict[str, Any]) -> str:
    """The markdown between a result's markers: its provenance line, its table and
    its ``figures["note"]`` if any.

    Args:
        name: the result file's name without ``.json``.
        record: the result (as :func:`load_result` returns it).

    Returns:
        Markdown ending in a newline.
    """
    figures = record["figures"]
    columns: list[str] = []
    for row in figures["table"]:
        columns += [c for c in row if c not in columns]
    lines = [provenance(name, record), "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in figures["table"]]
    if figures.get("note"):
        lines += ["", str(figures["note"])]
    return "\n".join(lines) + "\n"


def fill(text: str, results: Path = RESULTS) -> str:
    """``text`` with the body of every ``<!-- bench:NAME -->`` block rendered afresh."""
    # Blank lines around the body: markdown ends an HTML block (the marker) and a
    # table only at a blank line.
    return MARKERS.sub(lambda m: f"<!-- bench:{m['name']} -->\n\n{render(m['name'], load_result(m['name'], results))}"
                                 f"\n<!-- /bench:{m['name']} -->", text)


def stale_pages(docs: Path = DOCS, results: Path = RESULTS, write: bool = False) -> list[Path]:
    """The pages whose generated tables differ from their result files (rewritten
    when ``write``)."""
    stale = []
    for page in sorted(docs.glob("**/*.md")):
        text = page.read_text()
        filled = fill(text, results)
        if filled != text:
            stale.append(page)
            if write:
                page.write_text(filled)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is stale")
    args = parser.parse_args(argv)
    try:
        stale = stale_pages(write=not args.check)
    except ResultError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for page in stale:
        print(f"{page.relative_to(REPO)}: {'stale (run python -m bench.tables)' if args.check else 'rewritten'}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
