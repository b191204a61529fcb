"""What the CLI prints (issue 10, items 9, 15, 16): file names can neither inject
lines nor terminal escapes, piped output is one plain line per hit, warnings are
never glued to a progress bar, and the messages say the right thing."""

from __future__ import annotations

import io
import sys
from pathlib import Path

from conftest import make_image
from typer.testing import CliRunner

from cbir_cli.cli import app

runner = CliRunner()
EVIL = "evil\n\x1b[31mwarning: all good.jpg"


def test_printed_names_cannot_inject_lines_or_escape_codes(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    make_image(1).save(folder / "ok.jpg")
    (folder / EVIL).write_bytes(b"not an image")
    result = runner.invoke(app, ["index", str(folder), "--index", str(tmp_path / "index"), "--model", "test_tiny",
                                 "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: skipped {folder}/evil\\n\\x1b[31mwarning: all good.jpg: not a recognised image "
                        "format"]


def test_piped_query_prints_one_plain_line_per_hit(tmp_path):
    deep = tmp_path.joinpath(*[f"a-rather-long-folder-name-{i}" for i in range(4)])
    deep.mkdir(parents=True)
    for i in range(3):
        make_image(i).save(deep / f"image_with_a_long_name_{i}.jpg")
    make_image(9).save(deep / "tab\there.jpg")
    index = tmp_path / "index"
    assert runner.invoke(app, ["index", str(deep), "--index", str(index), "--model", "test_tiny",
                               "--workers", "0"]).exit_code == 0
    query = deep / "image_with_a_long_name_1.jpg"
    result = runner.invoke(app, ["query", str(query), "-k", "4", "--index", str(index)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and len(lines[0]) > 80
    fields = [line.split("\t") for line in lines]
    assert all(len(f) == 4 for f in fields)
    assert fields[0][0] == str(query) and fields[0][1] == "1" and fields[0][3] == str(query)
    assert [int(f[1]) for f in fields] == [1, 2, 3, 4]
    assert str(deep / "tab\\there.jpg") in {f[3] for f in fields}


def test_a_warning_is_never_glued_to_a_progress_bar(monkeypatch):
    from tqdm import tqdm

    from cbir_cli.cli.common import warn_skip

    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    bar = tqdm(total=10, file=sys.stderr, desc="embedding", mininterval=0)
    bar.update(3)
    warn_skip("/photos/x.jpg", "not a recognised image format")
    bar.close()
    text = err.getvalue()
    before, _, _ = text.partition("warning: skipped /photos/x.jpg")
    tail = before[before.rfind("]") + 1:]  # what was written between the bar and the warning
    assert tail.startswith("\r") and tail.endswith("\r") and tail.strip() == "" and " " in tail  # blanked


def test_the_model_mismatch_error_names_rebuild(tmp_path):
    """(Already so on main since the architecture issue; kept as a guard.)"""
    folder = tmp_path / "photos"
    folder.mkdir()
    make_image(1).save(folder / "a.jpg")
    index = str(tmp_path / "index")
    assert runner.invoke(app, ["index", str(folder), "--index", index, "--model", "test_tiny",
                               "--workers", "0"]).exit_code == 0
    result = runner.invoke(app, ["index", str(folder), "--index", index, "--model", "mobilenet_v2",
                                 "--workers", "0"])
    assert result.exit_code == 1 and "--rebuild" in result.stderr and len(result.stderr.splitlines()) == 1
    assert Path(index).exists()


def test_json_paths_that_are_not_utf8_come_with_their_exact_bytes(tmp_path):
    """A name with byte 0xff shows as U+FFFD in `path`; `path_bytes` (percent-encoded)
    gives the real path back, in `cbir query --json` and `cbir dedup --json`."""
    import json
    import os
    from urllib.parse import unquote_to_bytes

    folder = tmp_path / "photos"
    folder.mkdir()
    odd = folder / os.fsdecode(b"caf\xff.jpg")
    make_image(3).save(odd)
    make_image(3).save(folder / "copy.jpg")  # a duplicate of it
    make_image(5).save(folder / "other.jpg")
    index = tmp_path / "index"
    assert runner.invoke(app, ["index", str(folder), "--index", str(index), "--model", "test_tiny",
                               "--workers", "0"]).exit_code == 0
    result = runner.invoke(app, ["query", str(folder / "copy.jpg"), "-k", "3", "--index", str(index), "--json"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)[0]["results"]
    odd_hit = next(h for h in hits if "path_bytes" in h)
    assert odd_hit["path"].endswith("caf\ufffd.jpg") and unquote_to_bytes(odd_hit["path_bytes"]) == os.fsencode(odd)
    assert all("path_bytes" not in h for h in hits if h is not odd_hit)  # only where the display form lost bytes
    result = runner.invoke(app, ["dedup", "--index", str(index), "--json"])
    assert result.exit_code == 0, result.output
    members = [m for g in json.loads(result.stdout)["groups"] for m in g["members"]]
    odd_member = next(m for m in members if "path_bytes" in m)
    assert unquote_to_bytes(odd_member["path_bytes"]) == os.fsencode(odd)
