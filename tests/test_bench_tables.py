"""The docs' benchmark tables are generated from the committed result files
(``python -m bench.tables``) and cannot drift from them (issue 23)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `bench` is a package at the repository root, not installed

from bench import harness, tables

# Every bench ends with harness.write_result (none is exempt any more).
WITHOUT_RESULT_FILE: set[str] = set()


def test_the_docs_tables_equal_what_the_committed_result_files_render() -> None:
    stale = tables.stale_pages()
    assert not stale, f"run `python -m bench.tables`: stale tables in {[p.name for p in stale]}"


def test_every_docs_marker_names_a_committed_result_file() -> None:
    names = [m["name"] for page in tables.DOCS.glob("**/*.md") for m in tables.MARKERS.finditer(page.read_text())]
    assert names, "no generated table in the docs"
    for name in names:
        assert (harness.RESULTS / f"{name}.json").is_file(), name


def test_every_bench_writes_a_result_file() -> None:
    scripts = {p.stem for p in (REPO / "bench").glob("*.py") if 'if __name__ == "__main__"' in p.read_text()}
    missing = {s for s in scripts - WITHOUT_RESULT_FILE - {"tables"}
               if "write_result(" not in (REPO / "bench" / f"{s}.py").read_text()}
    assert not missing


def write(folder: Path, name: str, figures: object, **fields: object) -> None:
    record = {"name": name.split("-")[0], "command": "python -m bench.unit --n 3", "date": "2026-12-06",
              "machine": {"cpus": 2, "cpu_model": "AMD EPYC"}, "load": [0.5, 1.25, 2.0],
              "versions": {"python": "3.11.7", "commit": "0123456789abcdef"}, "figures": figures, **fields}
    (folder / f"{name}.json").write_text(json.dumps(record))


def test_a_marker_block_is_filled_with_the_run_and_its_table(tmp_path: Path) -> None:
    write(tmp_path, "unit-20261206-101500", {"table": [{"n": 100000, "index": "flat", "p50 ms": 0.41234},
                                                       {"n": 10000, "index": "a|b", "p50 ms": 12.3456},
                                                       {"n": 1, "index": "c", "p50 ms": 0.1, "s": 12345.6}],
                                             "note": "cells: best of 3"})
    page = "Before.\n\n<!-- bench:unit-20261206-101500 -->\nold table\n<!-- /bench:unit-20261206-101500 -->\nAfter.\n"
    filled = tables.fill(page, tmp_path)
    assert filled.startswith("Before.\n\n<!-- bench:unit-20261206-101500 -->\n\nPrinted by ")
    assert filled.endswith("\n\n<!-- /bench:unit-20261206-101500 -->\nAfter.\n")
    assert "old table" not in filled
    line = next(x for x in filled.splitlines() if x.startswith("Printed by"))
    assert "`python -m bench.unit --n 3`" in line and "2 cores (AMD EPYC)" in line
    assert "load 0.5 / 1.2 / 2.0" in line and "2026-12-06" in line and "commit 0123456" in line
    assert "bench/results/unit-20261206-101500.json" in line
    assert "| n | index | p50 ms | s |" in filled
    assert "| 100,000 | flat | 0.4123 | - |" in filled and "| 10,000 | a\\|b | 12.35 | - |" in filled
    assert "| 1 | c | 0.1 | 12,346 |" in filled  # a rounded figure is shown as rounded
    assert "cells: best of 3" in filled
    assert tables.fill(filled, tmp_path) == filled  # filling is idempotent


def test_an_old_result_without_date_or_load_field_still_names_them(tmp_path: Path) -> None:
    write(tmp_path, "old-20261130", {"table": [{"a": 1}]}, date=None, load=None, load_average_end=[3.0, 2.0, 1.0])
    text = tables.render("old-20261130", tables.load_result("old-20261130", tmp_path))
    assert "load 3.0 / 2.0 / 1.0" in text and "2026-11-30" in text


@pytest.mark.parametrize(("content", "reason"), [(None, "no such result file"), ("{", "not JSON"),
                                                 ('{"figures": {"rows": []}}', "no figures")])
def test_a_marker_naming_a_bad_result_file_is_one_clear_error(tmp_path: Path, content: str | None,
                                                                reason: str) -> None:
    if content is not None:
        (tmp_path / "bad.json").write_text(content)
    with pytest.raises(tables.ResultError, match=re.escape(reason)):
        tables.fill("<!-- bench:bad -->\n<!-- /bench:bad -->\n", tmp_path)
